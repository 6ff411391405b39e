//! Client addresses behind a proxy: trusted networks, and the PROXY protocol (v1 text and v2
//! binary, as HAProxy specifies it) that a TCP proxy such as nginx's `stream` module
//! (`proxy_protocol on;`) puts in front of the connection it forwards.
//!
//! A header is only read from a peer inside `mqtt.proxy_protocol_from`: from anyone else it
//! would be a way to claim any address. A trusted peer must send one; a connection from it
//! without a valid header is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A list of networks (`10.0.0.0/8`, `::1/128`, or a bare address), used to decide which peers
/// are proxies whose word about the client's address is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<Net>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or a network (a.b.c.d/len)"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Net { addr, prefix })
    }
}

impl Networks {
    /// Parses a list of networks; the first bad entry is the error.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        items
            .iter()
            .map(|s| s.as_ref().parse::<Net>())
            .collect::<Result<Vec<_>, _>>()
            .map(Networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is inside one of the networks (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// The client behind `X-Forwarded-For` values (`forwarded`, in header order). From a peer that
/// is not a trusted proxy: the peer, whatever it sends (anyone can write the header). From a
/// trusted proxy: walk the addresses from the right (each proxy appends the address it
/// received from) past trusted proxies; the first other address is the client (port 0). An
/// entry that does not parse ends the walk at the last one that did.
pub fn forwarded_client<'h>(
    peer: SocketAddr,
    forwarded: impl IntoIterator<Item = &'h str, IntoIter: DoubleEndedIterator>,
    trusted: &Networks,
) -> SocketAddr {
    if !trusted.contains(peer.ip()) {
        return peer;
    }
    let mut client = peer;
    let hops = forwarded.into_iter().rev().flat_map(|v| v.rsplit(','));
    for hop in hops {
        let Some(ip) = parse_hop(hop.trim()) else {
            break;
        };
        client = SocketAddr::new(ip, 0);
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `2001:db8::1`, `1.2.3.4:5678` or `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

impl<'de> Deserialize<'de> for Networks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        Networks::parse(&items).map_err(serde::de::Error::custom)
    }
}

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("connection closed inside the PROXY protocol header")]
    Closed,
}

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's figure).
const V1_MAX: usize = 107;
/// The largest v2 address block we accept (addresses plus TLVs; senders keep it small).
const V2_MAX_LEN: usize = 1024;

/// Reads one PROXY protocol header (v1 or v2) from the start of `r`, consuming exactly its
/// bytes. `Some(addr)`: the client's address as the proxy saw it; `None`: the proxy speaks for
/// itself (v1 `UNKNOWN`, v2 `LOCAL`, or a family other than TCP over IPv4/IPv6), so the peer
/// address stands.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    // 12 bytes: the v2 signature, and shorter than the shortest v1 header ("PROXY UNKNOWN\r\n").
    let mut head = [0u8; 12];
    read_exact(r, &mut head).await?;
    if head == V2_SIGNATURE {
        return read_v2(r).await;
    }
    if !head.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::Malformed("v1 header longer than 107 bytes"));
        }
        let mut b = [0u8; 1];
        read_exact(r, &mut b).await?;
        line.push(b[0]);
    }
    parse_v1(&line[..line.len() - 2])
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ProxyError> {
    r.read_exact(buf)
        .await
        .map(drop)
        .map_err(|_| ProxyError::Closed)
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>` (without CRLF), or `PROXY UNKNOWN ...` (whose rest
/// the specification says to ignore). Every TCP field is checked, the destination's too (what
/// the edge ignores could otherwise hide a line break or another header's bytes), and a TCP
/// line is printable ASCII.
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    const UNKNOWN: &[u8] = b"PROXY UNKNOWN";
    if line
        .strip_prefix(UNKNOWN)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b' ')
    {
        return Ok(None);
    }
    if !line.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(ProxyError::Malformed("v1 is not printable ASCII"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 is not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let proto = parts.next().unwrap_or("");
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::Malformed(
            "v1 needs four fields after the protocol",
        ));
    };
    let (ip, _) = match proto {
        "TCP4" => (v1_addr::<Ipv4Addr>(src)?, v1_addr::<Ipv4Addr>(dst)?),
        "TCP6" => (v1_addr::<Ipv6Addr>(src)?, v1_addr::<Ipv6Addr>(dst)?),
        _ => {
            return Err(ProxyError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let port = v1_port(sport)?;
    v1_port(dport)?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// A v1 address of the protocol's family.
fn v1_addr<A: FromStr + Into<IpAddr>>(s: &str) -> Result<IpAddr, ProxyError> {
    s.parse::<A>()
        .map(Into::into)
        .map_err(|_| ProxyError::Malformed("v1 address is not one of the protocol's family"))
}

/// Digits only, no leading zero: the specification's port format.
fn v1_port(s: &str) -> Result<u16, ProxyError> {
    let canonical = s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    s.parse()
        .ok()
        .filter(|_| canonical || s == "0")
        .ok_or(ProxyError::Malformed("v1 port is not a port number"))
}

async fn read_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut hdr = [0u8; 4];
    read_exact(r, &mut hdr).await?;
    let [ver_cmd, fam, hi, lo] = hdr;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::Malformed("v2 address block too long"));
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    match ver_cmd & 0x0f {
        0x0 => return Ok(None), // LOCAL: the proxy's own connection (health checks).
        0x1 => {}
        _ => return Err(ProxyError::Malformed("v2 command is not LOCAL or PROXY")),
    }
    let addr = match fam {
        // TCP over IPv4: src(4) dst(4) sport(2) dport(2).
        0x11 => {
            let b = body
                .get(..12)
                .ok_or(ProxyError::Malformed("v2 IPv4 address block too short"))?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([b[8], b[9]]))
        }
        // TCP over IPv6: src(16) dst(16) sport(2) dport(2).
        0x21 => {
            let b = body
                .get(..36)
                .ok_or(ProxyError::Malformed("v2 IPv6 address block too short"))?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&b[..16]);
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(src)),
                u16::from_be_bytes([b[32], b[33]]),
            )
        }
        // UNSPEC, UDP, unix sockets: nothing to say about a TCP client.
        _ => return Ok(None),
    };
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut r = bytes;
        let res = read_header(&mut r).await;
        (res, r.to_vec())
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn v1_tcp4_gives_the_source_and_leaves_the_rest_unread() {
        let (res, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8883\r\n\x10\x0c").await;
        assert_eq!(res, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"\x10\x0c");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (res, _) = read(b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 8883\r\n").await;
        assert_eq!(res, Ok(Some("[2001:db8::5]:4000".parse().unwrap())));
        let (res, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(res, Ok(None));
        assert_eq!(rest, b"X");
        // The rest of an UNKNOWN line is ignored, as the specification says.
        let (res, rest) = read(b"PROXY UNKNOWN ffff::1\n\xff 1 2\r\nX").await;
        assert_eq!(res, Ok(None));
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn v1_garbage_is_refused() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            // Found by the proxy_header fuzz target: a destination that is no address,
            // hiding a line break, was accepted along with the bytes after it.
            b"PROXY TCP6 2001:db8::5 2001:-\n8::1 4000 8883\r\n",
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\t\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \x01\r\n",
        ] {
            assert!(
                matches!(read(bad).await.0, Err(ProxyError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await.0,
            Err(ProxyError::Malformed("v1 header longer than 107 bytes"))
        ));
        // An MQTT CONNECT or a TLS ClientHello from a trusted peer that sends no header.
        assert_eq!(
            read(b"\x10\x1a\0\x04MQTT\x04\x02\0\x1e\0\x0e").await.0,
            Err(ProxyError::Missing)
        );
        assert_eq!(
            read(b"\x16\x03\x01\x02\0\x01\0\x01\xfc\x03\x03\0").await.0,
            Err(ProxyError::Missing)
        );
        assert_eq!(read(b"PROXY TCP4 1.2").await.0, Err(ProxyError::Closed));
    }

    #[tokio::test]
    async fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x22, 0xb3];
        body.extend_from_slice(&[0x04, 0, 1, 0xaa]); // a TLV, skipped
        let (res, rest) = read(&[v2(1, 0x11, &body), b"rest".to_vec()].concat()).await;
        assert_eq!(res, Ok(Some("198.51.100.9:8080".parse().unwrap())));
        assert_eq!(rest, b"rest");

        let mut body = Ipv6Addr::from(0x2001_0db8_0000_0000_0000_0000_0000_0042u128)
            .octets()
            .to_vec();
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0x01, 0xbb, 0x22, 0xb3]);
        let (res, _) = read(&v2(1, 0x21, &body)).await;
        assert_eq!(res, Ok(Some("[2001:db8::42]:443".parse().unwrap())));

        let (res, rest) = read(&[v2(0, 0x00, &[]), b"x".to_vec()].concat()).await;
        assert_eq!(res, Ok(None));
        assert_eq!(rest, b"x");

        assert!(matches!(
            read(&v2(1, 0x11, &[1, 2, 3])).await.0,
            Err(ProxyError::Malformed(_))
        ));
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(matches!(
            read(&bad_version).await.0,
            Err(ProxyError::Malformed(_))
        ));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert!(matches!(read(&huge).await.0, Err(ProxyError::Malformed(_))));
    }

    #[test]
    fn networks_match_by_prefix_and_family() {
        let n =
            Networks::parse(&["10.0.0.0/8", "192.168.1.5", "::1/128", "2001:db8::/32"]).unwrap();
        for yes in [
            "10.200.3.4",
            "192.168.1.5",
            "::1",
            "2001:db8:ffff::1",
            "::ffff:10.1.1.1",
        ] {
            assert!(n.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.168.1.6", "::2", "2001:db9::1", "127.0.0.1"] {
            assert!(!n.contains(no.parse().unwrap()), "{no}");
        }
        let all = Networks::parse(&["0.0.0.0/0"]).unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        assert!(
            Networks::default().is_empty()
                && !Networks::default().contains("127.0.0.1".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(Networks::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
