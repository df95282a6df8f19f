//! The fixed client of the web service workload: one request after
//! another over loopback, each on a connection of its own (`Connection:
//! close`, as a plain client without keep-alive sends them), every answer
//! checked and read to its Content-Length, as HTTP clients (urllib,
//! requests, browsers) read it: the development server closes its end of
//! a connection some milliseconds after the answer, and a client that
//! waited for that would time the server's close, not its work. Its time
//! is the service's throughput as one client sees it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::workload::RUN_TIMEOUT;

/// Requests sent before the tracer attaches, so that the app's first-request
/// work (routing tables, lazy imports) is not timed.
const WARM_UP: u64 = 20;

pub fn warm_up(port: u16) -> Result<()> {
    (0..WARM_UP).try_for_each(|_| get(port)).context("the service does not answer")
}

/// Sends `requests` requests and returns the seconds they took.
pub fn time_requests(port: u16, requests: u64) -> Result<f64> {
    let start = Instant::now();
    for i in 0..requests {
        get(port).with_context(|| format!("request {} of {requests}", i + 1))?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// One GET of `/`, whose answer is the audit list's length.
fn get(port: u16) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("cannot connect")?;
    stream.set_read_timeout(Some(RUN_TIMEOUT))?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: memtrace-bench\r\nConnection: close\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        bail!("the service answered {:?}", status.trim());
    }
    let mut length = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("the service's answer ends in its headers");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.context("the service's answer has no Content-Length")?];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    body.trim().parse::<u64>().with_context(|| format!("the service answered {body:?}"))?;
    Ok(())
}
