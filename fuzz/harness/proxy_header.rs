//! Fuzz harness `proxy_header`: what the edge reads before anything else from a trusted
//! proxy's connection (the PROXY protocol v1/v2 header), the `X-Forwarded-For` walk of the
//! WebSocket listener and the trusted-network lists of the settings. Shared by
//! `fuzz/fuzz_targets/proxy_header.rs` and the corpus replay test `broker/tests/fuzz_corpus.rs`.
//!
//! Input: the bytes of a connection, read through `read_header` from a `&[u8]` (an
//! `AsyncRead` that never waits, so `block_on` is the whole runtime). As text: the first line is
//! a comma-separated network list, the other lines are `X-Forwarded-For` header values.
//!
//! Checked: nothing panics; a header that is accepted was consumed exactly (v1: through its
//! CRLF, at most 107 bytes; v2: 16 bytes and its length); an accepted v1 TCP line is printable
//! ASCII (no line break or other bytes hidden in a field), and its address, written back into
//! a header, reads the same; the forwarded client is the peer, or a portless address from the
//! header when the peer is trusted.

use std::net::{IpAddr, SocketAddr};

use companion_broker::proxy::{self, Networks};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

pub fn run(data: &[u8]) {
    header(data);
    forwarded(&String::from_utf8_lossy(data));
}

fn header(data: &[u8]) {
    let mut rest = data;
    let res = futures::executor::block_on(proxy::read_header(&mut rest));
    let consumed = data.len() - rest.len();
    let Ok(addr) = res else {
        return;
    };
    if data.starts_with(V2_SIGNATURE) {
        let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
        assert_eq!(consumed, 16 + len, "a v2 header is consumed exactly");
        return;
    }
    assert!(data.starts_with(b"PROXY "), "only v1 and v2 are accepted");
    assert!(consumed <= 107, "a v1 header is at most 107 bytes");
    assert!(
        data[..consumed].ends_with(b"\r\n"),
        "v1 is read through CRLF"
    );
    if let Some(addr) = addr {
        let line = &data[..consumed - 2];
        assert!(
            line.iter().all(|b| (0x20..0x7f).contains(b)),
            "an accepted TCP4/TCP6 line is printable ASCII"
        );
        let line = match addr.ip() {
            IpAddr::V4(ip) => format!("PROXY TCP4 {ip} 127.0.0.1 {} 1\r\n", addr.port()),
            IpAddr::V6(ip) => format!("PROXY TCP6 {ip} ::1 {} 1\r\n", addr.port()),
        };
        let mut r = line.as_bytes();
        let again = futures::executor::block_on(proxy::read_header(&mut r));
        assert_eq!(again, Ok(Some(addr)), "{line:?}");
    }
}

fn forwarded(text: &str) {
    let mut lines = text.lines();
    let nets: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let values: Vec<&str> = lines.collect();
    let fixed = Networks::parse(&["10.0.0.0/8", "::1/128", "192.168.0.0/16"]).expect("valid");
    let parsed = Networks::parse(&nets).ok();
    let peers: [SocketAddr; 3] = [
        "10.1.2.3:40000".parse().expect("valid"),
        "[::1]:40000".parse().expect("valid"),
        "203.0.113.5:40000".parse().expect("valid"),
    ];
    for trusted in [Some(&fixed), parsed.as_ref()].into_iter().flatten() {
        for peer in peers {
            let _ = trusted.contains(peer.ip());
            let client = proxy::forwarded_client(peer, values.iter().copied(), trusted);
            if client != peer {
                assert!(
                    trusted.contains(peer.ip()),
                    "only a trusted peer is looked past"
                );
                assert_eq!(client.port(), 0, "a forwarded client has no port");
            }
        }
    }
}
