//! Test workloads run inside a test topology's namespaces (`kpr workload ...`, hidden): servers
//! that answer with their own address and the source address they saw, and clients that report
//! which backend answered and what address the socket API showed them. One JSON line per attempt
//! on stdout.
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: kpr workload serve ADDR...            (tcp+udp on each ADDR)\n\
         \x20      kpr workload tcp ADDR COUNT [DELAY_MS] [BIND_IP]\n\
         \x20      kpr workload udp ADDR COUNT [DELAY_MS] [BIND_IP]\n\
         \x20      kpr workload hold ADDR SECS INTERVAL_MS\n\
         \x20      kpr workload udpsendto ADDR COUNT   (one unconnected socket)\n\
         \x20      kpr workload udphold ADDR SECS INTERVAL_MS   (one connected UDP socket, \
         reconnected after an error)\n\
         \x20      kpr workload udpfixed ADDR SPORT SECS INTERVAL_MS   (one unconnected socket \
         bound to SPORT)\n\
         \x20      kpr workload bigline ADDR BYTES COUNT   (TCP: send a BYTES-long line, read \
         its echo)\n\
         \x20      kpr workload synflood ADDR COUNT SRC_NET   (raw TCP SYNs from random \
         addresses of SRC_NET/16 and ports)"
    );
    std::process::exit(2)
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::EDESTADDRREQ) => "EDESTADDRREQ".into(),
        _ if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            "ETIMEDOUT".into()
        }
        _ => format!("{e}"),
    }
}

fn serve(addrs: &[SocketAddr]) {
    let mut handles = Vec::new();
    for &addr in addrs {
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        handles.push(std::thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                std::thread::spawn(move || {
                    let me = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let peer = conn
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let mut w = conn.try_clone().expect("clone");
                    // First line: who answered, and the source address it saw.
                    if writeln!(w, "{me} {peer}").is_err() {
                        return;
                    }
                    // Echo lines until the client closes.
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(w, "{me} {line}").is_err() {
                            return;
                        }
                    }
                });
            }
        }));
        // SCTP too, where the kernel has it (one-to-one style: a stream socket).
        if let Ok(sctp) = sctp_socket(addr).and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(64)?;
            Ok(s)
        }) {
            handles.push(std::thread::spawn(move || {
                let me = addr.to_string();
                while let Ok((mut conn, _)) = sctp.accept() {
                    let peer = peer_ip(&conn);
                    // One write: each is a message of its own on SCTP.
                    let _ = conn.write_all(format!("{me} {peer}\n").as_bytes());
                }
            }));
        }
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        handles.push(std::thread::spawn(move || {
            let me = udp.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut buf = [0u8; 1500];
            loop {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{me} {}", from.ip()).as_bytes(), from);
                }
            }
        }));
    }
    println!("{{\"serving\":{}}}", addrs.len());
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
}

/// The peer address of a connected socket, from getpeername(2).
fn peer_ip(sock: &socket2::Socket) -> String {
    use std::os::fd::AsRawFd as _;
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername into a buffer of `len` bytes we own.
    let rc = unsafe {
        libc::getpeername(
            sock.as_raw_fd(),
            (&raw mut ss).cast::<libc::sockaddr>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return String::new();
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin = unsafe { &*(&raw const ss).cast::<libc::sockaddr_in>() };
            std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string()
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const ss).cast::<libc::sockaddr_in6>() };
            std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_string()
        }
        _ => String::new(),
    }
}

/// An SCTP stream socket of `to`'s family (fails where the kernel has no SCTP).
fn sctp_socket(to: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    socket2::Socket::new(
        domain,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
    )
}

/// One SCTP association: the server's first line names the backend and the source it saw.
fn sctp_once(to: SocketAddr, bind: Option<IpAddr>) -> String {
    let connected = sctp_socket(to).and_then(|s| {
        if let Some(ip) = bind {
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        s.connect_timeout(&to.into(), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    });
    match connected {
        Ok(mut s) => {
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut words = text.trim().split(' ');
            let backend = words.next().unwrap_or("");
            let seen = words.next().unwrap_or("");
            format!("{{\"backend\":\"{backend}\",\"seen_src\":\"{seen}\",\"peer\":\"{to}\"}}")
        }
        Err(e) => format!("{{\"error\":\"{}\"}}", errno_name(&e)),
    }
}

/// A TCP connection from `bind` (any address when `None`) to `to`.
fn tcp_connect(to: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind else {
        return TcpStream::connect_timeout(&to, Duration::from_secs(1));
    };
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(ip, 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(1))?;
    Ok(sock.into())
}

fn tcp_once(to: SocketAddr, bind: Option<IpAddr>) -> String {
    match tcp_connect(to, bind) {
        Ok(mut s) => {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            let mut words = line.split(' ');
            let backend = words.next().unwrap_or("");
            let seen = words.next().unwrap_or("");
            format!("{{\"backend\":\"{backend}\",\"seen_src\":\"{seen}\",\"peer\":\"{peer}\"}}")
        }
        Err(e) => format!("{{\"error\":\"{}\"}}", errno_name(&e)),
    }
}

/// One UDP exchange on a connected socket, so an ICMP error (a REJECT) surfaces as
/// ECONNREFUSED instead of a timeout.
fn udp_once(to: SocketAddr, bind: Option<IpAddr>) -> String {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0" } else { "::" }.parse().unwrap();
    let bind = SocketAddr::new(bind.unwrap_or(any), 0);
    let sock = UdpSocket::bind(bind).expect("bind udp client");
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    if let Err(e) = sock.connect(to).and_then(|()| sock.send(b"x").map(|_| ())) {
        return format!("{{\"error\":\"{}\"}}", errno_name(&e));
    }
    let mut buf = [0u8; 256];
    match sock
        .recv(&mut buf)
        .map(|n| (n, sock.peer_addr().unwrap_or(to)))
    {
        Ok((n, from)) => {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut words = text.split(' ');
            let backend = words.next().unwrap_or("");
            let seen = words.next().unwrap_or("");
            format!("{{\"backend\":\"{backend}\",\"seen_src\":\"{seen}\",\"peer\":\"{from}\"}}")
        }
        Err(e) => format!("{{\"error\":\"{}\"}}", errno_name(&e)),
    }
}

/// One *unconnected* UDP socket sending `count` datagrams with sendto() (QUIC-style): one
/// JSON line per datagram with the backend that answered and the address recvfrom() showed.
fn udp_sendto(to: SocketAddr, count: u64) {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0" } else { "::" }.parse().unwrap();
    let sock = UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind udp client");
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    for _ in 0..count {
        println!("{{{}}}", sendto_once(&sock, to));
        let _ = std::io::stdout().flush();
    }
}

/// One datagram with sendto() and its answer with recvfrom(), as JSON fields:
/// `"backend":...,"peer":...` or `"error":...`.
fn sendto_once(sock: &UdpSocket, to: SocketAddr) -> String {
    let mut buf = [0u8; 256];
    match sock
        .send_to(b"x", to)
        .and_then(|_| sock.recv_from(&mut buf))
    {
        Ok((n, from)) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            let backend = text.split(' ').next().unwrap_or("");
            format!("\"backend\":\"{backend}\",\"peer\":\"{from}\"")
        }
        Err(e) => format!("\"error\":\"{}\"", errno_name(&e)),
    }
}

/// A connected UDP socket: send, then receive (ICMP errors surface as ECONNREFUSED here).
fn udp_connected_once(to: SocketAddr) -> String {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0" } else { "::" }.parse().unwrap();
    let sock = UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind udp client");
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    if let Err(e) = sock.connect(to).and_then(|()| sock.send(b"x").map(|_| ())) {
        return format!("{{\"error\":\"{}\"}}", errno_name(&e));
    }
    let mut buf = [0u8; 256];
    match sock.recv(&mut buf) {
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let backend = text.split(' ').next().unwrap_or("").to_string();
            let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            format!("{{\"backend\":\"{backend}\",\"peer\":\"{peer}\"}}")
        }
        Err(e) => format!("{{\"error\":\"{}\"}}", errno_name(&e)),
    }
}

fn hold(to: SocketAddr, secs: u64, interval: Duration) {
    let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
        Ok(s) => s,
        Err(e) => {
            println!("{{\"error\":\"{}\"}}", errno_name(&e));
            return;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut hello = String::new();
    let _ = reader.read_line(&mut hello);
    println!(
        "{{\"connected\":\"{}\"}}",
        hello.split(' ').next().unwrap_or("").trim()
    );
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let mut line = String::new();
        let ok = writeln!(s, "ping{n}").is_ok()
            && reader.read_line(&mut line).map(|k| k > 0).unwrap_or(false);
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        if ok {
            println!("{{\"echo\":\"{}\",\"at_ms\":{at}}}", line.trim());
        } else {
            println!("{{\"error\":\"echo {n} failed\",\"at_ms\":{at}}}");
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(interval);
    }
}

/// Like an application with a long-lived connected UDP socket (a DNS client, say): one
/// socket, a request every `interval`, one JSON line per request ({"backend": ...} or
/// {"error": ...}); after an error it opens and connects a new socket, like a resolver would.
fn udp_hold(to: SocketAddr, secs: u64, interval: Duration) {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0" } else { "::" }.parse().unwrap();
    let connect = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.connect(to)?;
        Ok(s)
    };
    let mut sock = None;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let result = sock.take().map_or_else(connect, Ok).and_then(|s| {
            let mut buf = [0u8; 256];
            let n = s.send(b"x").and_then(|_| s.recv(&mut buf))?;
            sock = Some(s);
            let text = String::from_utf8_lossy(&buf[..n]);
            Ok(text.split(' ').next().unwrap_or("").to_string())
        });
        match result {
            Ok(backend) => println!("{{\"backend\":\"{backend}\"}}"),
            Err(e) => println!("{{\"error\":\"{}\"}}", errno_name(&e)),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(interval);
    }
}

/// A client whose UDP source port never changes (statsd, NTP, some DNS forwarders): one
/// *unconnected* socket bound to `sport`, a datagram every `interval` for `secs`, one JSON line
/// each: `{"t_ms": ms since start, "backend": ...}` or `{"t_ms": ..., "error": ...}`.
fn udp_fixed(to: SocketAddr, sport: u16, secs: u64, interval: Duration) {
    let any: IpAddr = if to.is_ipv4() { "0.0.0.0" } else { "::" }.parse().unwrap();
    let sock = UdpSocket::bind(SocketAddr::new(any, sport)).expect("bind the fixed port");
    sock.set_read_timeout(Some(interval.max(Duration::from_millis(50))))
        .ok();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = start.elapsed().as_millis();
        let mut buf = [0u8; 256];
        // Datagrams answered late (after their own timeout) are not this attempt's answer.
        while sock.set_nonblocking(true).is_ok() && sock.recv_from(&mut buf).is_ok() {}
        let _ = sock.set_nonblocking(false);
        println!("{{\"t_ms\":{t},{}}}", sendto_once(&sock, to));
        let _ = std::io::stdout().flush();
        let spent =
            Duration::from_millis(u64::try_from(start.elapsed().as_millis() - t).unwrap_or(0));
        std::thread::sleep(interval.saturating_sub(spent));
    }
}

/// One TCP connection that sends a `bytes`-long line (full-size segments: path MTU discovery
/// must work for them to arrive) and reads the server's echo of it.
fn big_line(to: SocketAddr, bytes: usize) -> String {
    let start = Instant::now();
    let result = tcp_connect(to, None).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut hello = String::new();
        reader.read_line(&mut hello)?;
        let mut line = vec![b'x'; bytes];
        line.push(b'\n');
        s.write_all(&line)?;
        let mut echo = String::new();
        reader.read_line(&mut echo)?;
        // The echo is "<server address> <line>".
        let got = echo.trim_end().rsplit(' ').next().map_or(0, str::len);
        if got == bytes {
            Ok(hello.split(' ').next().unwrap_or("").trim().to_string())
        } else {
            Err(std::io::Error::other(format!(
                "echo of {got} bytes, sent {bytes}"
            )))
        }
    });
    let ms = start.elapsed().as_millis();
    match result {
        Ok(backend) => format!("{{\"backend\":\"{backend}\",\"bytes\":{bytes},\"ms\":{ms}}}"),
        Err(e) => format!("{{\"error\":\"{}\",\"ms\":{ms}}}", errno_name(&e)),
    }
}

/// `count` TCP SYNs to `to` (IPv4) from random addresses of `src_net`/16 and random ports,
/// through a raw socket: the half-open flood a conntrack table must survive. Prints
/// `{"sent": n}`.
fn syn_flood(to: SocketAddr, count: u64, src_net: std::net::Ipv4Addr) {
    let SocketAddr::V4(to) = to else { usage() };
    // SAFETY: plain socket(2); the descriptor is closed at exit.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let dst = sockaddr_in(to);
    let mut rng = super::rng::FuzzRng(0x5eed_f100d);
    let net = src_net.octets();
    let mut sent = 0u64;
    for _ in 0..count {
        let r = rng.next_u64();
        let src = [net[0], net[1], (r >> 8) as u8, (r as u8).max(1)];
        let sport = 1024 + ((r >> 16) as u16 % 60000);
        let pkt = syn_packet(src, *to.ip(), sport, to.port(), (r >> 32) as u32);
        // SAFETY: pkt and dst outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const dst).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16),
            )
        };
        if n > 0 {
            sent += 1;
        }
    }
    println!("{{\"sent\":{sent}}}");
}

fn sockaddr_in(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: u16::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The one's complement sum of `data` as 16-bit big-endian words.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN with valid checksums.
fn syn_packet(src: [u8; 4], dst: std::net::Ipv4Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst.octets());
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// `count` rounds of connect + read the server's first line + close; prints the latency
/// percentiles in microseconds.
fn bench(to: SocketAddr, count: usize) {
    let mut samples = Vec::with_capacity(count);
    let mut failures = 0;
    for _ in 0..count {
        let start = Instant::now();
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(mut s) => {
                let mut byte = [0u8; 1];
                let _ = s.read(&mut byte);
                drop(s);
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
            Err(_) => failures += 1,
        }
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        serde_json::json!({"n": samples.len(), "failures": failures, "p50_us": pct(0.5), "p90_us": pct(0.9)})
    );
}

/// One HTTP/1.0 GET; prints {"status": N, "body": "..."} or {"error": ...}.
fn http_get(to: SocketAddr, path: &str) {
    let line = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            let status: u16 = resp
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            serde_json::json!({"status": status, "body": body}).to_string()
        }
        Err(e) => format!("{{\"error\":\"{}\"}}", errno_name(&e)),
    };
    println!("{line}");
}

/// Runs a workload; `args` are what follows `kpr workload`.
pub fn run(args: &[String]) {
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let num = |i: usize, d: u64| -> u64 { args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d) };
    match args.first().map(String::as_str) {
        Some("serve") => serve(&(1..args.len()).map(addr).collect::<Vec<_>>()),
        Some("udphold") => udp_hold(addr(1), num(2, 10), Duration::from_millis(num(3, 100))),
        Some("udpsendto") => udp_sendto(addr(1), num(2, 1)),
        Some("udpc") => {
            for _ in 0..num(2, 1) {
                println!("{}", udp_connected_once(addr(1)));
                let _ = std::io::stdout().flush();
            }
        }
        Some(mode @ ("tcp" | "udp" | "sctp")) => {
            let to = addr(1);
            let delay = Duration::from_millis(num(3, 0));
            let bind: Option<IpAddr> = args.get(4).and_then(|a| a.parse().ok());
            for _ in 0..num(2, 1) {
                let line = match mode {
                    "tcp" => tcp_once(to, bind),
                    "sctp" => sctp_once(to, bind),
                    _ => udp_once(to, bind),
                };
                println!("{line}");
                let _ = std::io::stdout().flush();
                std::thread::sleep(delay);
            }
        }
        Some("udpfixed") => udp_fixed(
            addr(1),
            u16::try_from(num(2, 40053)).unwrap_or(40053),
            num(3, 5),
            Duration::from_millis(num(4, 100)),
        ),
        Some("bigline") => {
            for _ in 0..num(3, 1) {
                println!(
                    "{}",
                    big_line(addr(1), usize::try_from(num(2, 65536)).unwrap_or(65536))
                );
                let _ = std::io::stdout().flush();
            }
        }
        Some("synflood") => syn_flood(
            addr(1),
            num(2, 1000),
            args.get(3)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage()),
        ),
        Some("hold") => hold(addr(1), num(2, 5), Duration::from_millis(num(3, 200))),
        Some("bench") => bench(addr(1), usize::try_from(num(2, 1000)).unwrap_or(1000)),
        Some("http") => http_get(addr(1), args.get(2).map_or("/", String::as_str)),
        _ => usage(),
    }
}
