//! A real S3-compatible server on loopback for the tests: moto's server mode (`pip install
//! 'moto[server]'`), named by `STARLING_MOTO_SERVER`; `.ci/run` installs it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Credentials;

/// A running S3 server, stopped when dropped.
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("finding a free port: {e}"));
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.to_string_lossy()));
        let server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.request("GET", "/").is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    /// The URL to reach it at.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Credentials it accepts.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            access_key_id: "starling-test".into(),
            secret_access_key: "starling-test-secret".into(),
        }
    }

    /// Creates the bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let status = self
            .request("PUT", &format!("/{name}"))
            .unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
        assert_eq!(status, 200, "creating bucket {name}");
    }

    /// One HTTP/1.1 request without a body; its status code.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let host = self.addr;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        let code = std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse().ok());
        code.ok_or_else(|| std::io::Error::other("not an HTTP reply"))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
