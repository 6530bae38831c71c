//! Slow, greedy and sloppy clients (issue 18): the header deadline, the
//! per-address connection cap, `Expect: 100-continue`, malformed framing,
//! and the gateway's `Server` header on every answer tollgate makes. Real
//! binaries over real TCP; the greedy clients connect from other loopback
//! addresses (127.0.0.0/8 is all loopback on Linux).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SERVER: &str = "OzekiNG/3.0.1 Microsoft-HTTPAPI/1.0";

/// A connection to `to` from the loopback address `from`.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = (std::net::Ipv4Addr::from(from), 0).into();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

fn getcredits(tg: &Tollgate) -> (u16, String) {
    get(&tg.url("/api?action=getcredits&username=john&password=secret1"))
}

#[test]
fn a_header_trickled_byte_by_byte_is_cut_off_at_the_deadline() {
    let (_sim, tg) = start_pair(&[], "downstream: { header_timeout_ms: 1000 }");
    let mut s = TcpStream::connect(tg.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let header =
        b"GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\nHost: x\r\n";
    let mut answer = Vec::new();
    for &b in header.iter().cycle() {
        // One byte every 50 ms: each read is quick, the header never ends.
        if s.write_all(&[b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still open after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    println!("closed after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "closed too late: {took:?}");
    let text = String::from_utf8_lossy(&answer);
    if !text.is_empty() {
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(SERVER), "{text}");
    }
    wait_until(
        || tg.metric("tollgate_downstream_header_timeouts_total") == Some(1.0),
        "the header timeout to be counted",
    );
    // A well-behaved client is unaffected.
    assert_eq!(getcredits(&tg).0, 200);
}

#[test]
fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let (_sim, tg) = start_pair(&[], "downstream: { max_connections_per_ip: 5 }");
    let held: Vec<TcpStream> = (0..5)
        .map(|_| connect_from([127, 0, 0, 2], tg.addr))
        .collect();
    wait_until(
        || tg.metric("tollgate_downstream_connections") == Some(5.0),
        "five connections to be open",
    );
    let mut sixth = connect_from([127, 0, 0, 2], tg.addr);
    sixth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let answer = read_answer(&mut sixth);
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("server").as_deref(), Some(SERVER));
    assert!(answer.header("retry-after").is_some());
    assert_eq!(
        tg.metric("tollgate_downstream_connections_refused_total"),
        Some(1.0)
    );
    // Another address is served meanwhile.
    assert_eq!(getcredits(&tg).0, 200);
    // Closing frees the share.
    drop(held);
    wait_until(
        || {
            tg.metric("tollgate_downstream_connections")
                .is_some_and(|n| n <= 1.0)
        },
        "the held connections to close",
    );
    let mut again = connect_from([127, 0, 0, 2], tg.addr);
    again
        .write_all(b"GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut again).status, 200);
}

#[test]
fn clients_are_served_while_a_thousand_slow_connections_are_held() {
    let (_sim, tg) = start_pair(
        &[],
        "downstream: { header_timeout_ms: 60000, max_connections_per_ip: 64 }\n\
         limits: { concurrent_per_ip: { max: 1000 } }",
    );
    // 16 addresses × 64 connections, each with half a header sent.
    let mut held = Vec::new();
    for host in 2..18u8 {
        for _ in 0..64 {
            let mut s = connect_from([127, 0, 0, host], tg.addr);
            s.write_all(b"GET /api?action=getcredits HTTP/1.1\r\nHost:")
                .unwrap();
            held.push(s);
        }
    }
    wait_until(
        || {
            tg.metric("tollgate_downstream_connections")
                .is_some_and(|n| n >= 1000.0)
        },
        "a thousand connections to be open",
    );
    let started = Instant::now();
    for _ in 0..50 {
        let (status, body) = getcredits(&tg);
        assert_eq!(status, 200, "{body}");
    }
    let took = started.elapsed();
    println!(
        "50 requests beside {} held connections: {took:?}",
        held.len()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        tg.metric("tollgate_downstream_connections_refused_total"),
        Some(0.0)
    );
}

/// Writes a request header, waits for `100 Continue`, then sends the body.
fn expect_continue(tg: &Tollgate, path: &str, body: &str) -> RawAnswer {
    let mut s = TcpStream::connect(tg.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim)
        .expect("a 100 Continue within 3 s");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    read_answer(&mut s)
}

#[test]
fn expect_100_continue_is_answered() {
    let (sim, tg) = start_pair(&[], "");
    // A send tollgate reads itself.
    let answer = expect_continue(
        &tg,
        "/api",
        "action=sendmessage&username=john&password=secret1&recipient=%2B36301111111&messagedata=hi",
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        xml_field(&answer.text(), "statuscode").as_deref(),
        Some("0")
    );
    assert_eq!(sim.sendmessage_count(), 1);
    // A credit door.
    let answer = expect_continue(&tg, "/boxis", "version=1.0&action=getCreditLimit");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("server").as_deref(), Some(SERVER));
}

#[test]
fn malformed_chunk_sizes_are_the_clients_error() {
    let (sim, tg) = start_pair(&[], "");
    for size in ["zz", "fffffffffffffffffffffffff", "-1"] {
        let req = format!(
            "POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             {size}\r\naction=sendmessage\r\n0\r\n\r\n"
        );
        let answer = raw_exchange(tg.addr, req.as_bytes());
        assert_eq!(answer.status, 400, "{size}: {answer:?}");
        assert_eq!(answer.header("server").as_deref(), Some(SERVER), "{size}");
    }
    wait_until(
        || {
            tg.metric("tollgate_requests_total{action=\"-\",front_door=\"ozeki\",outcome=\"bad_request\"}")
                == Some(3.0)
        },
        "three bad_request outcomes",
    );
    assert_eq!(sim.requests().len(), 0);
    let text = get(&tg.admin_url("/metrics")).1;
    assert!(!text.contains("outcome=\"upstream_error\""), "{text}");
}

#[test]
fn soap_envelopes_with_control_characters_get_a_fault_of_their_version() {
    let (_sim, tg) = start_pair(&[], "");
    let path = "/WebServices/2.2/Simple/Account.asmx";
    for (ns, content_type, fault_marker) in [
        (
            "http://schemas.xmlsoap.org/soap/envelope/",
            "text/xml; charset=utf-8",
            "<faultcode>",
        ),
        (
            "http://www.w3.org/2003/05/soap-envelope",
            "application/soap+xml; charset=utf-8",
            "<soap:Code>",
        ),
    ] {
        let body = format!(
            "<?xml version=\"1.0\"?><soap:Envelope xmlns:soap=\"{ns}\"><soap:Body>\
             <GetBalance xmlns=\"http://www.2sms.com/WebServices/2.2/Simple/\">\
             <Username>jo\u{1}hn</Username><Password>x\u{0}</Password></GetBalance>\
             </soap:Body></soap:Envelope>"
        );
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
             SOAPAction: \"http://www.2sms.com/WebServices/2.2/Simple/GetBalance\"\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = raw_exchange(tg.addr, req.as_bytes());
        let text = answer.text();
        assert_eq!(answer.status, 500, "{text}");
        assert!(text.contains(ns), "{text}");
        assert!(text.contains(fault_marker), "{content_type}: {text}");
        assert_eq!(answer.header("server").as_deref(), Some(SERVER));
    }
}

#[test]
fn every_answer_tollgate_makes_carries_the_gateways_server_header() {
    let (_sim, tg) = start_pair(
        &[],
        "downstream: { body_timeout_ms: 300, header_limit_bytes: 2048 }\n\
         ozeki: { body_limit_bytes: 2048 }\n\
         limits: { source_ip: { requests_per_s: 1000, burst: 1000 } }",
    );
    let mut answers = Vec::new();
    // Local answers of the Ozeki door, the credit doors, limits, errors.
    for req in [
        "GET /api?action=getcredits&username=john&password=secret1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        "POST /boxis HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\nversion".to_string(),
        "GET /WebServices/2.2/Simple/Account.asmx?WSDL HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        format!("POST /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4000\r\n\r\n{}", "a".repeat(4000)),
        format!("GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "b".repeat(3000)),
    ] {
        answers.push(raw_exchange(tg.addr, req.as_bytes()));
    }
    // A body that never comes: 408.
    let mut s = TcpStream::connect(tg.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\naction=")
        .unwrap();
    answers.push(read_answer(&mut s));
    // Answers pingora makes before any tollgate code runs.
    for req in [
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n",
        "\u{1}\u{2}garbage\r\n\r\n",
    ] {
        answers.push(raw_exchange(tg.addr, req.as_bytes()));
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 413, 431, 408, 400, 405, 400]);
    for a in &answers {
        assert_eq!(a.header("server").as_deref(), Some(SERVER), "{a:?}");
    }
}
