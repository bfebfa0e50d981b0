//! A real S3-compatible server on loopback for the tests: moto's server mode (`pip install
//! 'moto[server]'`), named by `STARLING_MOTO_SERVER`; `.ci/run` installs it.
//!
//! Clients reach it through a front that does what moto alone does not: it refuses a
//! request signed with any access key but [`S3Server::credentials`]'s, as S3 does
//! (`403 InvalidAccessKeyId`), and it can fail the next connections on demand (500, or
//! no answer for a while) to show what storage's faults cost. The front looks at each
//! connection's first request only, which is enough for clients that sign every request
//! with one key.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Credentials;
use crate::env::{AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY};

/// The access key the server accepts.
const KEY_ID: &str = "starling-test";
const SECRET: &str = "starling-test-secret";

/// What the front does to the next connections.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answers `500 Internal Server Error` and closes.
    Error500,
    /// Answers nothing for this long, then closes.
    Stall(Duration),
}

/// A running S3 server, stopped when dropped.
pub struct S3Server {
    child: Child,
    /// moto itself.
    upstream: SocketAddr,
    /// The front clients reach.
    front: SocketAddr,
    /// Faults still to inflict, one per connection.
    faults: Arc<Mutex<(usize, Option<Fault>)>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

impl S3Server {
    /// Starts the server named by `STARLING_MOTO_SERVER`; `None` when it is not set
    /// (required under `CI`, which installs it).
    pub fn start() -> Option<Self> {
        let Some(program) = std::env::var_os("STARLING_MOTO_SERVER") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must test object storage: set STARLING_MOTO_SERVER"
            );
            eprintln!("STARLING_MOTO_SERVER not set: skipped the test against S3");
            return None;
        };
        let port = free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.to_string_lossy()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the S3 front");
        let server = Self {
            child,
            upstream: SocketAddr::from(([127, 0, 0, 1], port)),
            front: listener.local_addr().expect("the front's address"),
            faults: Arc::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(server.upstream, "GET", "/").is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (upstream, faults) = (server.upstream, server.faults.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let fault = {
                    let mut f = faults.lock().unwrap_or_else(|p| p.into_inner());
                    let left = f.0;
                    f.0 = left.saturating_sub(1);
                    f.1.filter(|_| left > 0)
                };
                std::thread::spawn(move || serve(conn, upstream, fault));
            }
        });
        Some(server)
    }

    /// The URL to reach it at.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.front)
    }

    /// The access key it accepts (any other is refused), named as a Secret holds it.
    pub fn key(&self) -> Vec<(String, String)> {
        vec![
            (AWS_ACCESS_KEY_ID.into(), KEY_ID.into()),
            (AWS_SECRET_ACCESS_KEY.into(), SECRET.into()),
        ]
    }

    /// Credentials it accepts.
    pub fn credentials(&self) -> Credentials {
        Credentials::Given(self.key())
    }

    /// Writes [`Self::credentials`] into `dir` as a mounted Secret holds them: a file per
    /// setting.
    pub fn write_credentials(&self, dir: &std::path::Path) {
        std::fs::create_dir_all(dir).expect("creating the credentials directory");
        for (name, value) in self.key() {
            std::fs::write(dir.join(name), value).expect("writing a credential");
        }
    }

    /// Creates the bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let status = request(self.upstream, "PUT", &format!("/{name}"))
            .unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
        assert_eq!(status, 200, "creating bucket {name}");
    }

    /// Inflicts `fault` on the next `connections` connections.
    pub fn fail_next(&self, connections: usize, fault: Fault) {
        let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        *f = (connections, Some(fault));
    }

    /// Connections still to fail.
    pub fn failures_left(&self) -> usize {
        let f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        f.0
    }
}

/// One connection through the front.
fn serve(mut client: TcpStream, upstream: SocketAddr, fault: Option<Fault>) {
    let Some(head) = read_head(&mut client) else {
        return;
    };
    match fault {
        Some(Fault::Error500) => {
            let _ = reply(
                &mut client,
                "500 Internal Server Error",
                "InternalError",
                "injected",
            );
            return;
        }
        Some(Fault::Stall(wait)) => {
            std::thread::sleep(wait);
            return;
        }
        None => {}
    }
    match key_id(&head).as_deref() {
        Some(KEY_ID) => {}
        Some(_) => {
            let message = "The AWS Access Key Id you provided does not exist in our records.";
            let _ = reply(&mut client, "403 Forbidden", "InvalidAccessKeyId", message);
            return;
        }
        None => {
            let _ = reply(
                &mut client,
                "403 Forbidden",
                "AccessDenied",
                "Anonymous access",
            );
            return;
        }
    }
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    if up.write_all(&head).is_err() {
        return;
    }
    let (Ok(mut client_back), Ok(mut up_back)) = (client.try_clone(), up.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client, &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_back, &mut client_back);
    let _ = client_back.shutdown(std::net::Shutdown::Both);
    let _ = forward.join();
}

/// What the client sent up to the end of its first request's headers (and whatever of
/// the body came with them).
fn read_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).ok().filter(|n| *n > 0)?;
        head.extend_from_slice(&buf[..n]);
        if head.len() > 1 << 20 {
            return None;
        }
    }
    Some(head)
}

/// The access key a request is signed with: its `Authorization` header's, or a signed
/// URL's `X-Amz-Credential`.
fn key_id(head: &[u8]) -> Option<String> {
    // The headers only: what follows them may be a binary body.
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&head[..end]);
    let at = text.find("Credential=")? + "Credential=".len();
    let rest = &text[at..];
    let end = rest.find(['/', '%', '&', ' ', ','])?;
    Some(rest[..end].to_owned())
}

/// An S3 error reply.
fn reply(client: &mut TcpStream, status: &str, code: &str, message: &str) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    );
    write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One HTTP/1.1 request without a body to `addr`; its status code.
fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let code = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok());
    code.ok_or_else(|| std::io::Error::other("not an HTTP reply"))
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
