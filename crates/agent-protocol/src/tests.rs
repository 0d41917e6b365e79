#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;

fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
    let mut buf = Vec::new();
    write_frame(&mut buf, msg).unwrap();
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    assert_eq!(len, buf.len() - 4, "the prefix is the body's length");
    read_frame(&mut buf.as_slice()).unwrap()
}

#[test]
fn every_request_and_response_survives_a_round_trip() {
    let requests = [
        Request::Ping {},
        Request::CreateContainer {
            container_id: "c1".into(),
            rootfs: Rootfs {
                device: "/dev/vdb".into(),
                fstype: "ext4".into(),
                readonly: false,
            },
        },
        Request::Attach {
            container_id: "c1".into(),
            exec_id: String::new(),
            stream: Stream::Stderr,
        },
        Request::StartProcess {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process: ProcessSpec {
                args: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10],
                terminal: false,
            },
        },
        Request::Signal {
            container_id: "c1".into(),
            exec_id: String::new(),
            signal: 9,
            all: true,
        },
        Request::Wait {
            container_id: "c1".into(),
            exec_id: String::new(),
        },
        Request::CloseStdin {
            container_id: "c1".into(),
            exec_id: String::new(),
        },
        Request::ResizePty {
            container_id: "c1".into(),
            exec_id: String::new(),
            rows: 24,
            cols: 80,
        },
        Request::ListProcesses {
            container_id: "c1".into(),
        },
        Request::DeleteContainer {
            container_id: "c1".into(),
        },
        Request::Shutdown {},
    ];
    for r in &requests {
        assert_eq!(&round_trip(r), r);
    }
    let responses = [
        Response::Ok {},
        Response::Started { pid: 7 },
        Response::Exited { status: 137 },
        Response::Pids { pids: vec![1, 2] },
        Response::Error {
            message: "no such container".into(),
        },
    ];
    for r in &responses {
        assert_eq!(&round_trip(r), r);
    }
    assert_eq!(round_trip(&hello("x")), hello("x"));
}

#[test]
fn the_wire_format_is_the_documented_one() {
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &Request::Wait {
            container_id: "c".into(),
            exec_id: String::new(),
        },
    )
    .unwrap();
    assert_eq!(
        &buf[4..],
        br#"{"op":"wait","container_id":"c","exec_id":""}"#.as_slice()
    );
    let mut buf = Vec::new();
    write_frame(&mut buf, &Response::Exited { status: 3 }).unwrap();
    assert_eq!(&buf[4..], br#"{"result":"exited","status":3}"#.as_slice());
    let mut buf = Vec::new();
    write_frame(&mut buf, &hello("flatlet-agent 0.1.0")).unwrap();
    assert_eq!(
        buf.as_slice(),
        b"\x00\x00\x00\x2e{\"version\":2,\"software\":\"flatlet-agent 0.1.0\"}".as_slice(),
        "PROTOCOL.md's example"
    );
}

#[test]
fn terminal_requests_have_the_documented_form() {
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &Request::ResizePty {
            container_id: "c".into(),
            exec_id: "e".into(),
            rows: 37,
            cols: 101,
        },
    )
    .unwrap();
    assert_eq!(
        &buf[4..],
        br#"{"op":"resize_pty","container_id":"c","exec_id":"e","rows":37,"cols":101}"#.as_slice()
    );
    let spec = ProcessSpec {
        args: vec!["sh".into()],
        terminal: true,
        ..ProcessSpec::default()
    };
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.ends_with(r#""terminal":true}"#), "{json}");
    // Sizes are 16-bit, as the kernel's: a larger one is a bad frame.
    let body = br#"{"op":"resize_pty","container_id":"c","exec_id":"","rows":65536,"cols":80}"#;
    let mut buf = (body.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(body);
    assert!(matches!(
        read_frame::<_, Request>(&mut buf.as_slice()),
        Err(FrameError::Json(_))
    ));
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let mut buf = (u32::MAX).to_be_bytes().to_vec();
    buf.extend_from_slice(b"{}");
    match read_frame::<_, Request>(&mut buf.as_slice()) {
        Err(FrameError::TooLarge { len }) => assert_eq!(len, u32::MAX as usize),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let over = (MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        read_frame::<_, Request>(&mut over.as_slice()),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn an_oversized_message_is_not_sent() {
    let big = Request::CreateContainer {
        container_id: "x".repeat(MAX_FRAME),
        rootfs: Rootfs {
            device: String::new(),
            fstype: String::new(),
            readonly: false,
        },
    };
    let mut buf = Vec::new();
    assert!(matches!(
        write_frame(&mut buf, &big),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(buf.is_empty(), "nothing written");
}

#[test]
fn truncated_and_empty_input_are_errors() {
    assert!(matches!(
        read_frame::<_, Request>(&mut [].as_slice()),
        Err(FrameError::Closed)
    ));
    assert!(matches!(
        read_frame::<_, Request>(&mut [0u8, 0].as_slice()),
        Err(FrameError::Io(_))
    ));
    let mut buf = 10u32.to_be_bytes().to_vec();
    buf.extend_from_slice(b"{\"op\"");
    assert!(matches!(
        read_frame::<_, Request>(&mut buf.as_slice()),
        Err(FrameError::Io(_))
    ));
}

#[test]
fn bad_json_and_unknown_fields_are_errors() {
    for body in [
        &b"not json"[..],
        br#"{"op":"launch_missiles"}"#,
        br#"{"op":"ping","extra":1}"#,
        br#"{"op":"wait","container_id":"c"}"#,
        br#"[]"#,
    ] {
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(body);
        assert!(
            matches!(
                read_frame::<_, Request>(&mut buf.as_slice()),
                Err(FrameError::Json(_))
            ),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn frames_follow_each_other_on_one_stream() {
    let mut buf = Vec::new();
    write_frame(&mut buf, &hello("shim")).unwrap();
    write_frame(&mut buf, &Request::Ping {}).unwrap();
    let mut r = buf.as_slice();
    let h: Hello = read_frame(&mut r).unwrap();
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Request::Ping {});
    assert!(matches!(
        read_frame::<_, Request>(&mut r),
        Err(FrameError::Closed)
    ));
}
