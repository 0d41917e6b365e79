//! The task service containerd calls: one flatlet microVM per container,
//! its processes run by the agent inside.
//!
//! Pods: containerd's CRI groups a pod's containers under one sandbox id
//! (the `io.kubernetes.cri.sandbox-id` annotation). `start_shim` groups by
//! it, so one shim serves a whole pod; each container still gets a VM of
//! its own here. Sharing one VM needs a drive per container added to a
//! running VM (placeholder drives, pointed at the container's image with
//! `PATCH /drives`), which is the same hook the snapshot template needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::api::{self, Status};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField, well_known_types::timestamp::Timestamp};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{Code, Error as TtrpcError, get_status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use flatlet_agent_protocol::{ProcessSpec, Request, Response, Rootfs, Stream};

use crate::agent::Agent;
use crate::config::Config;
use crate::spec::{SANDBOX_ID_ANNOTATION, parse_process, read_bundle};
use crate::stdio::{Input, Outputs};
use crate::vm::{Vm, clean_after_shim, clean_jail, jail_id};
use crate::{image, stdio, template};

/// The container's drive in the guest: the second virtio-blk device.
const CONTAINER_DEVICE: &str = "/dev/vdb";

fn err(code: Code, msg: impl std::fmt::Display) -> TtrpcError {
    TtrpcError::RpcStatus(get_status(code, msg.to_string()))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

struct Proc {
    spec: ProcessSpec,
    stdin: String,
    stdout: String,
    stderr: String,
    status: Status,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    stdin_handle: Option<Input>,
}

impl Proc {
    fn new(spec: ProcessSpec, stdin: String, stdout: String, stderr: String) -> Self {
        Self {
            spec,
            stdin,
            stdout,
            stderr,
            status: Status::CREATED,
            exit_status: 0,
            exited_at: None,
            stdin_handle: None,
        }
    }
}

struct Container {
    id: String,
    bundle: String,
    workdir: PathBuf,
    vm: Vm,
    agent: Agent,
    procs: Mutex<HashMap<String, Proc>>,
    changed: Condvar,
}

impl Container {
    fn procs(&self) -> MutexGuard<'_, HashMap<String, Proc>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Inner {
    namespace: String,
    exit: ExitSignal,
    publisher: Mutex<Option<RemotePublisher>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

/// The shim and its task service (one value, cloned for each).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let publisher = self.inner.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = publisher.as_ref()
            && let Err(e) = p.publish(Context::default(), topic, &self.inner.namespace, event)
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        let map = self.inner.containers.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("no container {id}")))
    }

    fn workdir(config: &Config, namespace: &str, id: &str) -> PathBuf {
        config.state_dir.join(namespace).join(id)
    }

    /// The image, the VM, the agent, the container in it; everything
    /// undone on failure.
    fn build(
        &self,
        config: &Config,
        req: &api::CreateTaskRequest,
        spec: ProcessSpec,
    ) -> Result<Container, String> {
        let workdir = Self::workdir(config, &self.inner.namespace, &req.id);
        std::fs::create_dir_all(&workdir).map_err(|e| format!("creating {}: {e}", workdir.display()))?;
        let result = self.build_in(config, req, spec, &workdir);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&workdir);
        }
        result
    }

    fn build_in(
        &self,
        config: &Config,
        req: &api::CreateTaskRequest,
        spec: ProcessSpec,
        workdir: &Path,
    ) -> Result<Container, String> {
        let rootfs = Path::new(&req.bundle).join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
        image::mount_rootfs(&req.rootfs, &rootfs).map_err(|e| e.to_string())?;
        let disk = workdir.join("rootfs.ext4");
        let needed = image::size_for(&rootfs);
        let templated = config.template && needed <= template::DISK_SIZE;
        let size = if templated { template::DISK_SIZE } else { needed };
        let built = image::build(&rootfs, &disk, size);
        if !req.rootfs.is_empty() {
            image::unmount_rootfs(&rootfs);
        }
        let took = built.map_err(|e| e.to_string())?;
        log::info!("{}: rootfs image built in {} ms", req.id, took.as_millis());
        // A template that cannot be had is a slower start, not a failure.
        let template = templated.then(|| template::ensure(config)).and_then(|t| {
            t.map_err(|e| log::warn!("{}: no template, booting: {e}", req.id))
                .ok()
        });
        let jail = jail_id(&self.inner.namespace, &req.id);
        clean_jail(config, &jail).map_err(|e| e.to_string())?;
        let vm = Vm::start(
            config,
            &jail,
            &disk,
            &workdir.join("console.log"),
            template.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let _ = std::fs::write(workdir.join("vmm.pid"), vm.pid().to_string());
        // The jail has its own link to the image.
        let _ = std::fs::remove_file(&disk);
        let agent = Agent::new(&vm.vsock());
        let ready = agent
            .wait_ready(Duration::from_secs(config.boot_timeout_secs), || vm.alive())
            .and_then(|took| {
                log::info!(
                    "{}: agent answered {} ms after the VM started",
                    req.id,
                    took.as_millis()
                );
                agent.call_ok(&Request::CreateContainer {
                    container_id: req.id.clone(),
                    rootfs: Rootfs {
                        device: CONTAINER_DEVICE.into(),
                        fstype: "ext4".into(),
                        readonly: false,
                    },
                })
            });
        if let Err(e) = ready {
            let _ = vm.stop();
            return Err(format!(
                "{e} (guest console: {})",
                workdir.join("console.log").display()
            ));
        }
        let mut procs = HashMap::new();
        procs.insert(
            String::new(),
            Proc::new(spec, req.stdin.clone(), req.stdout.clone(), req.stderr.clone()),
        );
        Ok(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            workdir: workdir.to_path_buf(),
            vm,
            agent,
            procs: Mutex::new(procs),
            changed: Condvar::new(),
        })
    }

    /// Attaches the process's streams, starts it, and a thread that waits for it.
    fn start_process(&self, c: &Arc<Container>, exec_id: &str) -> TtrpcResult<()> {
        let (spec, paths) = {
            let procs = c.procs();
            let p = procs
                .get(exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("no process {exec_id}")))?;
            if p.status != Status::CREATED {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("process {exec_id:?} was started already"),
                ));
            }
            (
                p.spec.clone(),
                [p.stdin.clone(), p.stdout.clone(), p.stderr.clone()],
            )
        };
        let [stdin, stdout, mut stderr] = paths;
        if spec.terminal {
            // The terminal carries everything on stdout (containerd passes
            // no stderr for a terminal).
            stderr.clear();
        }
        let mut outputs = Outputs::default();
        let mut stdin_handle = None;
        // Our own handles on the streams: a start that fails closes them, so
        // that containerd's FIFOs end and nothing waits for a process that
        // never ran.
        let mut opened = Vec::new();
        let started = (|| {
            if !stdin.is_empty() {
                let s = c.agent.attach(&c.id, exec_id, Stream::Stdin)?;
                opened.extend(s.try_clone().ok());
                stdin_handle = stdio::relay_in(s, stdin);
            }
            for (path, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
                if !path.is_empty() {
                    let s = c.agent.attach(&c.id, exec_id, stream)?;
                    opened.extend(s.try_clone().ok());
                    outputs.relay_out(s, path);
                }
            }
            let request = Request::StartProcess {
                container_id: c.id.clone(),
                exec_id: exec_id.into(),
                process: spec,
            };
            c.agent.call(&request)
        })();
        match started {
            Ok(Response::Started { pid }) => {
                log::info!("{}: process {exec_id:?} is pid {pid} in the guest", c.id)
            }
            failed => {
                for s in &opened {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                let message = match failed {
                    Err(e) => e.to_string(),
                    Ok(other) => format!("the agent answered {other:?}"),
                };
                log::error!("{}: starting {exec_id:?}: {message}", c.id);
                self.mark_exited(c, exec_id, 255);
                return Err(err(Code::UNAVAILABLE, message));
            }
        }
        if let Some(p) = c.procs().get_mut(exec_id) {
            p.status = Status::RUNNING;
            p.stdin_handle = stdin_handle;
        }
        let (service, c, exec_id) = (self.clone(), Arc::clone(c), exec_id.to_string());
        std::thread::spawn(move || service.await_exit(&c, &exec_id, outputs));
        Ok(())
    }

    fn await_exit(&self, c: &Arc<Container>, exec_id: &str, outputs: Outputs) {
        let status = match c.agent.wait(&c.id, exec_id) {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "{}: lost process {exec_id:?}: {e} (VM {}; guest console: {})",
                    c.id,
                    if c.vm.alive() { "running" } else { "ended" },
                    c.workdir.join("console.log").display()
                );
                255
            }
        };
        // What the process wrote reaches containerd before its exit does.
        outputs.finish(Duration::from_secs(10));
        self.mark_exited(c, exec_id, status as u32);
    }

    fn mark_exited(&self, c: &Container, exec_id: &str, status: u32) {
        let at = now();
        {
            let mut procs = c.procs();
            let Some(p) = procs.get_mut(exec_id) else { return };
            if p.status == Status::STOPPED {
                return;
            }
            p.status = Status::STOPPED;
            p.exit_status = status;
            p.exited_at = Some(at.clone());
            p.stdin_handle = None;
        }
        c.changed.notify_all();
        let id = if exec_id.is_empty() {
            c.id.clone()
        } else {
            exec_id.to_string()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: c.id.clone(),
                id,
                pid: c.vm.pid(),
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    /// Ends the container's VM and removes its files.
    /// The VM holds this container alone and its image is thrown away, so
    /// the VMM is simply ended (SIGTERM: flatlet stops the VM at once);
    /// asking the agent to unmount and power off first cost tens of
    /// seconds of emulated guest work on nested hosts. A VM shared by a
    /// pod would get `DeleteContainer` instead.
    fn teardown(&self, c: &Container) {
        if let Err(e) = c.vm.stop() {
            log::error!("{}: {e}", c.id);
        }
        let _ = std::fs::remove_dir_all(&c.workdir);
    }
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace: args.namespace.clone(),
                exit: ExitSignal::default(),
                publisher: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // containerd runs `start` in the bundle: a pod's containers share
        // a shim (the CRI's sandbox id).
        let grouping = read_bundle(Path::new("."))
            .ok()
            .and_then(|(_, ann)| ann.get(SANDBOX_ID_ANNOTATION).cloned())
            .unwrap_or_else(|| opts.id.clone());
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // After the shim died: whatever it left of this container.
        let id = std::env::current_dir()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        if let Ok(config) = Config::load() {
            let workdir = Self::workdir(&config, &self.inner.namespace, &id);
            let pid = std::fs::read_to_string(workdir.join("vmm.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            let jail = jail_id(&self.inner.namespace, &id);
            if let Err(e) = clean_after_shim(&config, &jail, pid) {
                // containerd logs what a failed `delete` says.
                eprintln!("flatlet: cleaning up after the shim of {id}: {e}");
            }
            let _ = std::fs::remove_dir_all(&workdir);
        }
        image::unmount_rootfs(Path::new("rootfs"));
        let mut resp = DeleteResponse::new();
        resp.exit_status = 137;
        resp.exited_at = MessageField::some(now());
        Ok(resp)
    }

    fn wait(&mut self) {
        self.inner.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *self.inner.publisher.lock().unwrap_or_else(|p| p.into_inner()) = Some(publisher);
        self.clone()
    }
}

impl containerd_shim::Task for Service {
    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.vm.pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let config = Config::load().map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        let (mut spec, _annotations) =
            read_bundle(Path::new(&req.bundle)).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        // A terminal, asked by the spec or by the I/O (containerd sets both).
        spec.terminal |= req.terminal;
        if self.container(&req.id).is_ok() {
            return Err(err(Code::ALREADY_EXISTS, format!("container {} exists", req.id)));
        }
        let c = self
            .build(&config, &req, spec)
            .map_err(|e| err(Code::INTERNAL, format!("flatlet: {e}")))?;
        let pid = c.vm.pid();
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), Arc::new(c));
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        self.start_process(&c, &req.exec_id)?;
        let pid = c.vm.pid();
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let procs = c.procs();
        let p = procs
            .get(&req.exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("no process {}", req.exec_id)))?;
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: c.vm.pid(),
            status: p.status.into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.spec.terminal,
            exit_status: p.exit_status,
            exited_at: p.exited_at.clone().into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let mut procs = c.procs();
        loop {
            let p = procs
                .get(&req.exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("no process {}", req.exec_id)))?;
            if p.status == Status::STOPPED {
                return Ok(api::WaitResponse {
                    exit_status: p.exit_status,
                    exited_at: p.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            procs = c.changed.wait(procs).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let status = c.procs().get(&req.exec_id).map(|p| p.status);
        match status {
            None => return Err(err(Code::NOT_FOUND, format!("no process {}", req.exec_id))),
            Some(Status::STOPPED) => return Err(err(Code::NOT_FOUND, "process already finished")),
            // Never started: it ends here, killed.
            Some(Status::CREATED) => {
                self.mark_exited(&c, &req.exec_id, 128 + req.signal);
                return Ok(api::Empty::new());
            }
            Some(_) => {}
        }
        let request = Request::Signal {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal as i32,
            all: req.all,
        };
        if let Err(e) = c.agent.call_ok(&request) {
            // SIGKILL for the container's first process must work even when
            // the agent cannot be reached: ending the VM ends the container.
            if req.signal != 9 || !req.exec_id.is_empty() {
                return Err(err(Code::UNAVAILABLE, e));
            }
            log::warn!("{}: the agent did not take SIGKILL ({e}); ending the VM", c.id);
            self.mark_exited(&c, "", 128 + 9);
            if let Err(e) = c.vm.stop() {
                log::error!("{}: {e}", c.id);
            }
        }
        Ok(api::Empty::new())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let c = self.container(&req.id)?;
        let (exit_status, exited_at) = {
            let procs = c.procs();
            let p = procs
                .get(&req.exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("no process {}", req.exec_id)))?;
            if p.status == Status::RUNNING {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("process {:?} is running", req.exec_id),
                ));
            }
            (p.exit_status, p.exited_at.clone().unwrap_or_else(now))
        };
        if req.exec_id.is_empty() {
            self.inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.id);
            self.teardown(&c);
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: c.id.clone(),
                    pid: c.vm.pid(),
                    exit_status,
                    exited_at: MessageField::some(exited_at.clone()),
                    id: c.id.clone(),
                    ..Default::default()
                }),
            );
        } else {
            c.procs().remove(&req.exec_id);
        }
        Ok(DeleteResponse {
            pid: c.vm.pid(),
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let json = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let mut spec = parse_process(&json).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        spec.terminal |= req.terminal;
        {
            let mut procs = c.procs();
            if procs.contains_key(&req.exec_id) {
                return Err(err(Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
            }
            procs.insert(
                req.exec_id.clone(),
                Proc::new(spec, req.stdin.clone(), req.stdout.clone(), req.stderr.clone()),
            );
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let request = Request::ListProcesses {
            container_id: c.id.clone(),
        };
        match c.agent.call(&request).map_err(|e| err(Code::UNAVAILABLE, e))? {
            Response::Pids { pids } => Ok(api::PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| containerd_shim::protos::api::ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            other => Err(err(Code::INTERNAL, format!("the agent answered {other:?}"))),
        }
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let request = Request::ResizePty {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        c.agent
            .call_ok(&request)
            .map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        if req.stdin {
            // The agent is not asked (`close_stdin` would drop what the
            // process has not read yet): closing the host's end is enough.
            let input = c
                .procs()
                .get_mut(&req.exec_id)
                .and_then(|p| p.stdin_handle.take());
            if let Some(input) = input {
                input.close(Duration::from_secs(2));
            }
        }
        Ok(api::Empty::new())
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
