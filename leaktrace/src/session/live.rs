//! What a session shows while it runs: the Prometheus endpoint and the `top` view, both fed a
//! report of the top stacks each interval.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Session;
use crate::error::{Error, Result};
use crate::heap::Sample;
use crate::report::prometheus::{encode_metrics, TracerUsage, TOP_STACKS};
use crate::report::{Report, ReportMeta, ReportOptions, TargetInfo};

/// The `top` view's side of a session: reports go to it, a quit comes back.
pub struct LiveView {
    /// Stacks per report.
    pub top: usize,
    pub reports: std::sync::mpsc::Sender<Arc<Report>>,
    pub quit: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// The metrics endpoint: the latest exposition, served to every scrape.
pub(super) struct Exporter {
    text: Arc<Mutex<String>>,
}

impl Exporter {
    /// Listens on `addr` and serves `GET /metrics` from a task of the session's runtime.
    pub(super) async fn start(addr: SocketAddr) -> Result<Exporter> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Usage(format!("--prometheus {addr}: cannot listen: {e}")))?;
        let text = Arc::new(Mutex::new(String::from("# EOF\n")));
        let shared = text.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let body = shared.lock().map(|t| t.clone()).unwrap_or_default();
                tokio::spawn(async move {
                    // One request per connection: read its head (it may come in pieces),
                    // answer, close.
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        let read = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            conn.read(&mut chunk),
                        );
                        match read.await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                    }
                    let req = String::from_utf8_lossy(&buf);
                    let path = req.split_whitespace().nth(1).unwrap_or("");
                    let (status, body) = if path == "/metrics" || path == "/" {
                        ("200 OK", body)
                    } else {
                        ("404 Not Found", "try /metrics\n".to_string())
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; \
                         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(Exporter { text })
    }

    pub(super) fn update(&self, r: &Report, p: &Sample) {
        let text = encode_metrics(r, p, TracerUsage::of_self());
        if let Ok(mut t) = self.text.lock() {
            *t = text;
        }
    }
}

impl Session<'_> {
    /// A report of the `top` stacks as they are now (for the live outputs; the final report is
    /// built with everything once tracing ends).
    pub(super) fn snapshot(&mut self, top: usize) -> Report {
        let (meta, opts) = self.running_report(top);
        Report::build(&self.heap, &mut self.sym, meta, opts)
    }

    /// The header and options of a report taken while tracing goes on, of its `top` stacks.
    pub(super) fn running_report(&self, top: usize) -> (ReportMeta, ReportOptions) {
        let meta = ReportMeta {
            target: TargetInfo {
                pid: self.proc.pid,
                command: self.proc.cmdline(),
                end: "running".into(),
                ..TargetInfo::default()
            },
            mode: self.opts.mode.kind(),
            sample_rate: self.sample_rate(),
            duration_s: self.start.elapsed().as_secs_f64(),
            counters: self.counters.named(),
            interpreter: self.plan.python.as_ref().map(|p| p.module.clone()),
            ..ReportMeta::default()
        };
        let opts = ReportOptions {
            top,
            ..self.opts.report
        };
        (meta, opts)
    }

    /// Feeds the metrics endpoint and the `top` view after an interval.
    pub(super) fn publish(&mut self, point: &Sample, live: &Option<LiveView>) {
        if self.exporter.is_none() && live.is_none() {
            return;
        }
        let top = live.as_ref().map_or(TOP_STACKS, |l| l.top.max(TOP_STACKS));
        let r = self.snapshot(top);
        if let Some(e) = &self.exporter {
            e.update(&r, point);
        }
        if let Some(l) = live {
            let _ = l.reports.send(Arc::new(r));
        }
    }
}
