//! The metrics address: `/metrics` (OpenMetrics or the classic text format, as asked),
//! `/healthz` (`ok`), `/configz`, `/proxyMode`, `/debug/diff`, and the extra paths the
//! daemon adds (the debug endpoints).

use std::net::SocketAddr;

use super::{Metrics, CONTENT_TYPE};
use crate::config::Mode;
use crate::daemon::http::{Response, Server};

/// The classic Prometheus text format's content type.
pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text → Prometheus text format 0.0.4: counter families are named with
/// their `_total` suffix in `# HELP`/`# TYPE` (as upstream exposes them), `# UNIT` and
/// `# EOF` lines go. Samples are the same in both formats.
pub(crate) fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = l
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| l.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(kind);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Serves `/metrics`, `/healthz` and `/proxyMode`.
pub fn serve(addr: SocketAddr, metrics: Metrics, mode: Mode) -> std::io::Result<Server> {
    serve_with(addr, metrics, mode, Box::new(|_| None))
}

/// Extra paths on the metrics address (the debug endpoints): None when not handled.
pub(crate) type ExtraHandler =
    Box<dyn Fn(&crate::daemon::http::Request) -> Option<Response> + Send + Sync>;

/// [`serve`], plus the paths `extra` answers.
pub fn serve_with(
    addr: SocketAddr,
    metrics: Metrics,
    mode: Mode,
    extra: ExtraHandler,
) -> std::io::Result<Server> {
    crate::daemon::http::serve(addr, move |req: &crate::daemon::http::Request| {
        if let Some(r) = extra(req) {
            return r;
        }
        match req.path.split('?').next().unwrap_or("") {
            // OpenMetrics for scrapers that ask for it (Prometheus does); otherwise the
            // classic text format, as upstream's server answers a plain request.
            "/metrics" if req.accept.contains("application/openmetrics-text") => Response {
                status: 200,
                headers: vec![("Content-Type", CONTENT_TYPE.into())],
                body: metrics.render(),
            },
            "/metrics" => Response {
                status: 200,
                headers: vec![("Content-Type", TEXT_CONTENT_TYPE.into())],
                body: openmetrics_to_text(&metrics.render()),
            },
            "/healthz" => Response {
                status: 200,
                headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                body: "ok".into(),
            },
            "/configz" => match metrics
                .inner
                .configz
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            {
                Some(body) => Response {
                    status: 200,
                    headers: vec![("Content-Type", "application/json".into())],
                    body,
                },
                None => Response {
                    status: 404,
                    headers: vec![],
                    body: "404 page not found\n".into(),
                },
            },
            "/debug/diff" => match metrics.last_diff() {
                Some(body) => Response {
                    status: 200,
                    headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                    body,
                },
                None => Response {
                    status: 404,
                    headers: vec![],
                    body: "no comparison yet (shadow mode only)\n".into(),
                },
            },
            "/proxyMode" => Response {
                status: 200,
                headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
                body: mode.as_str().into(),
            },
            _ => Response {
                status: 404,
                headers: vec![],
                body: "404 page not found\n".into(),
            },
        }
    })
}
