//! The VMM thread: one event loop (event-manager) that owns the
//! controller and waits on every event source: the end of the VM, the
//! i8042 reset, console input, signals, API requests.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use flatlet_devices::bus::lock;
use flatlet_devices::serial::Serial;
use flatlet_devices::timer::Timer;
use log::{debug, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::controller::{Controller, ControllerError, Request, Response};
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::FLUSH_INTERVAL_SECS;

/// A boxed event subscriber.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// epoll failed.
    #[error("event loop: {0}")]
    EventManager(#[from] event_manager::Error),
    /// An eventfd could not be made.
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    /// The metrics timer could not be made.
    #[error("event loop timer: {0}")]
    Timer(#[from] vmm_sys_util::errno::Error),
}

/// Where console input comes from.
pub trait ConsoleInput: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ConsoleInput for T {}

/// A request from another thread (the API server), with what to do with
/// its answer.
pub struct ApiCall {
    /// The request.
    pub request: Request,
    /// Called on the VMM thread with the result.
    pub reply: Box<dyn FnOnce(Result<Response, ControllerError>) + Send>,
}

/// Sends requests to the VMM thread: a channel, and an eventfd that wakes
/// its loop.
#[derive(Clone)]
pub struct ApiSender {
    tx: mpsc::Sender<ApiCall>,
    evt: Arc<EventFd>,
}

impl ApiSender {
    /// Queues a call; gives it back if the VMM thread has gone.
    pub fn send(&self, call: ApiCall) -> Result<(), Box<ApiCall>> {
        self.tx.send(call).map_err(|e| Box::new(e.0))?;
        if let Err(e) = self.evt.write(1) {
            warn!("cannot wake the VMM thread: {e}");
        }
        Ok(())
    }
}

/// The VMM thread's loop.
pub struct Runtime {
    em: EventManager<Subscriber>,
    controller: Controller,
    stop: Arc<ExitSignal>,
    console: Option<Box<dyn ConsoleInput>>,
    vm_subscribers: Vec<SubscriberId>,
    api: Option<(mpsc::Receiver<ApiCall>, ApiSender)>,
    metrics_due: Arc<AtomicBool>,
}

impl Runtime {
    /// A loop around `controller`, feeding `console` (if any) to the
    /// guest's serial port once the VM runs.
    pub fn new(controller: Controller, console: Option<Box<dyn ConsoleInput>>) -> Result<Self, RuntimeError> {
        let mut em: EventManager<Subscriber> = EventManager::new()?;
        let stop = Arc::new(ExitSignal::new()?);
        em.add_subscriber(Box::new(StopWatch { stop: stop.clone() }));
        let metrics_due = Arc::new(AtomicBool::new(false));
        let timer = Timer::new()?;
        let period = Duration::from_secs(FLUSH_INTERVAL_SECS);
        timer.reset(period, Some(period))?;
        em.add_subscriber(Box::new(MetricsTimer {
            timer,
            due: metrics_due.clone(),
        }));
        Ok(Self {
            em,
            controller,
            stop,
            console,
            vm_subscribers: Vec::new(),
            api: None,
            metrics_due,
        })
    }

    /// A handle other threads send requests through.
    pub fn api_sender(&mut self) -> Result<ApiSender, RuntimeError> {
        if let Some((_, sender)) = &self.api {
            return Ok(sender.clone());
        }
        let (tx, rx) = mpsc::channel();
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        self.em.add_subscriber(Box::new(Wake { evt: evt.clone() }));
        let sender = ApiSender { tx, evt };
        self.api = Some((rx, sender.clone()));
        Ok(sender)
    }

    /// Handles the calls the API thread has queued.
    fn serve_api(&mut self) {
        let calls: Vec<ApiCall> = match &self.api {
            Some((rx, _)) => rx.try_iter().collect(),
            None => return,
        };
        for call in calls {
            let result = self.handle(call.request);
            (call.reply)(result);
        }
    }

    /// Where to report a request to end flatlet (a signal, a console
    /// escape): the loop ends the VM and returns.
    pub fn stop_handle(&self) -> Arc<ExitSignal> {
        self.stop.clone()
    }

    /// Adds an event source.
    pub fn add_subscriber(&mut self, s: Subscriber) -> SubscriberId {
        self.em.add_subscriber(s)
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Handles one request; a successful start (a boot or a snapshot
    /// load) hooks the VM's event sources into the loop.
    pub fn handle(&mut self, req: Request) -> Result<Response, ControllerError> {
        let starting = matches!(req, Request::Start | Request::LoadSnapshot(_));
        let result = self.controller.handle(req);
        if starting && result.is_ok() {
            self.watch_vm();
            // The VM is built: from now on the VMM thread needs only what
            // a running VM asks of it.
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::VmmRuntime) {
                log::error!("{e}");
                self.stop.report(VmExit::Seccomp(e.to_string()));
            }
        }
        result
    }

    fn watch_vm(&mut self) {
        let Some(vm) = self.controller.vm() else { return };
        let Ok(exit_evt) = vm.exit.evt.try_clone() else {
            warn!("cannot watch the VM's events");
            return;
        };
        let watch = VmWatch { exit_evt };
        self.vm_subscribers.push(self.em.add_subscriber(Box::new(watch)));
        for slot in &vm.virtio {
            self.vm_subscribers
                .push(self.em.add_subscriber(Box::new(slot.device.clone())));
        }
        if let Some(input) = self.console.take() {
            match vm.serial_input_ready.try_clone() {
                Ok(ready) => {
                    let console = ConsolePump {
                        input,
                        serial: vm.serial.clone(),
                        ready,
                        pending: Vec::new(),
                        stop: self.stop.clone(),
                        escape: false,
                        input_closed: false,
                    };
                    self.vm_subscribers
                        .push(self.em.add_subscriber(Box::new(console)));
                }
                Err(e) => warn!("console input disabled: {e}"),
            }
        }
    }

    /// Runs one round of the loop (waiting at most `timeout_ms`, or forever
    /// when negative). Returns how the VM or flatlet ended, if it did.
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<Option<VmExit>, RuntimeError> {
        self.em.run_with_timeout(timeout_ms)?;
        if self.metrics_due.swap(false, Ordering::Relaxed) && self.controller.has_metrics() {
            if let Err(e) = self.controller.flush_metrics() {
                warn!("{e}");
            }
        }
        self.serve_api();
        if let Some(reason) = self.stop.get() {
            return Ok(Some(self.controller.shut_down(reason)));
        }
        Ok(self.controller.poll_exit())
    }

    /// Runs until the VM ends or flatlet is asked to stop.
    pub fn run(&mut self) -> Result<VmExit, RuntimeError> {
        loop {
            if let Some(exit) = self.run_once(-1)? {
                return Ok(exit);
            }
        }
    }
}

/// Wakes the loop for API calls (the loop drains them).
struct Wake {
    evt: Arc<EventFd>,
}

impl MutEventSubscriber for Wake {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            warn!("cannot watch API requests: {e}");
        }
    }
}

/// Marks metrics due every minute.
struct MetricsTimer {
    timer: Timer,
    due: Arc<AtomicBool>,
}

impl MutEventSubscriber for MetricsTimer {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        self.timer.consume();
        self.due.store(true, Ordering::Relaxed);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            warn!("cannot watch the metrics timer: {e}");
        }
    }
}

/// Wakes the loop when a stop is requested.
struct StopWatch {
    stop: Arc<ExitSignal>,
}

impl MutEventSubscriber for StopWatch {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.stop.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stop.evt, EventSet::IN)) {
            warn!("cannot watch stop requests: {e}");
        }
    }
}

/// Wakes the loop when the end of the VM is reported (by a vCPU thread,
/// the i8042's reset included).
struct VmWatch {
    exit_evt: EventFd,
}

impl MutEventSubscriber for VmWatch {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.exit_evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.exit_evt, EventSet::IN)) {
            warn!("cannot watch the VM: {e}");
        }
    }
}

/// Ctrl-A, then `x`: leave the console (and end flatlet).
const ESCAPE: u8 = 0x01;

/// Moves console input into the UART, no faster than the guest reads it:
/// what the FIFO cannot take waits in `pending` (and stdin is not read)
/// until the UART signals room.
struct ConsolePump {
    input: Box<dyn ConsoleInput>,
    serial: Arc<Mutex<Serial>>,
    ready: EventFd,
    pending: Vec<u8>,
    stop: Arc<ExitSignal>,
    escape: bool,
    input_closed: bool,
}

impl ConsolePump {
    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// Pushes pending bytes into the UART.
    fn push(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
    }

    /// Reads what stdin has, watching for the escape sequence.
    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        match self.input.read(&mut buf) {
            Ok(0) | Err(_) => {
                debug!("console input closed");
                self.input_closed = true;
                let _ = ops.remove(Events::empty_raw(self.input_fd()));
            }
            Ok(n) => {
                for &b in &buf[..n] {
                    if self.escape {
                        self.escape = false;
                        if b == b'x' {
                            self.stop.report(VmExit::ConsoleQuit);
                            return;
                        }
                        if b != ESCAPE {
                            self.pending.push(ESCAPE);
                        }
                        self.pending.push(b);
                    } else if b == ESCAPE {
                        self.escape = true;
                    } else {
                        self.pending.push(b);
                    }
                }
            }
        }
    }

    /// Watches stdin only while nothing is pending.
    fn update_interest(&self, ops: &mut EventOps) {
        if self.input_closed {
            return;
        }
        let want = if self.pending.is_empty() {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        let _ = ops.modify(Events::new_raw(self.input_fd(), want));
    }
}

impl MutEventSubscriber for ConsolePump {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ready.as_raw_fd() {
            let _ = self.ready.read();
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read_input(ops);
        }
        self.push();
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.ready, EventSet::IN)) {
            warn!("console input disabled: {e}");
            return;
        }
        // A regular file or /dev/null cannot be polled: no console input.
        if let Err(e) = ops.add(Events::new_raw(self.input_fd(), EventSet::IN)) {
            debug!("console input not watched: {e}");
            self.input_closed = true;
        }
    }
}
