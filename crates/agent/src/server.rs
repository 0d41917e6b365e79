//! One connection from the shim: the version handshake, one request, one
//! answer (or, for `Attach`, the connection handed to a process).

use std::sync::Arc;

use flatlet_agent_protocol::{
    FrameError, Hello, PROTOCOL_VERSION, Request, Response, hello, read_frame, write_frame,
};
use socket2::Socket;

use crate::container::{ContainerError, State};

const SOFTWARE: &str = concat!("flatlet-agent ", env!("CARGO_PKG_VERSION"));

/// What became of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (or refused); closed.
    Done,
    /// The shim asked for the VM to end.
    Shutdown,
}

/// Serves one connection to its end.
pub fn serve(mut conn: Socket, state: &Arc<State>) -> Result<Outcome, FrameError> {
    let theirs: Hello = read_frame(&mut conn)?;
    write_frame(&mut conn, &hello(SOFTWARE))?;
    if theirs.version != PROTOCOL_VERSION {
        // The shim sees our version in our Hello and gives up; nothing more.
        eprintln!(
            "flatlet-agent: {} speaks protocol {}, this agent {PROTOCOL_VERSION}: refused",
            theirs.software, theirs.version
        );
        return Ok(Outcome::Done);
    }
    let request: Request = read_frame(&mut conn)?;
    if let Request::Attach {
        container_id,
        exec_id,
        stream,
    } = request
    {
        let kept = conn.try_clone()?;
        let answer = match state.attach(&container_id, &exec_id, stream, kept) {
            Ok(()) => Response::Ok {},
            Err(e) => error(&e),
        };
        write_frame(&mut conn, &answer)?;
        return Ok(Outcome::Done);
    }
    let shutdown = matches!(request, Request::Shutdown {});
    let answer = handle(request, state).unwrap_or_else(|e| error(&e));
    write_frame(&mut conn, &answer)?;
    Ok(if shutdown {
        Outcome::Shutdown
    } else {
        Outcome::Done
    })
}

fn error(e: &ContainerError) -> Response {
    Response::Error {
        message: e.to_string(),
    }
}

fn handle(request: Request, state: &State) -> Result<Response, ContainerError> {
    let ok = Response::Ok {};
    Ok(match request {
        Request::Ping {} | Request::Shutdown {} => ok,
        Request::CreateContainer { container_id, rootfs } => {
            state.create(&container_id, &rootfs)?;
            ok
        }
        Request::StartProcess {
            container_id,
            exec_id,
            process,
        } => Response::Started {
            pid: state.start(&container_id, &exec_id, &process)?,
        },
        Request::Signal {
            container_id,
            exec_id,
            signal,
            all,
        } => {
            state.signal(&container_id, &exec_id, signal, all)?;
            ok
        }
        Request::Wait {
            container_id,
            exec_id,
        } => Response::Exited {
            status: state.wait(&container_id, &exec_id)?,
        },
        Request::CloseStdin {
            container_id,
            exec_id,
        } => {
            state.close_stdin(&container_id, &exec_id)?;
            ok
        }
        Request::ResizePty {
            container_id,
            exec_id,
            rows,
            cols,
        } => {
            state.resize(&container_id, &exec_id, rows, cols)?;
            ok
        }
        Request::ListProcesses { container_id } => Response::Pids {
            pids: state.pids(&container_id)?,
        },
        Request::DeleteContainer { container_id } => {
            state.delete(&container_id)?;
            ok
        }
        // Handled by the caller; kept for a complete match.
        Request::Attach { .. } => Response::Error {
            message: "attach is not a plain request".into(),
        },
    })
}
