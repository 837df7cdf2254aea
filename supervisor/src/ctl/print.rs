//! Turning replies into text: tables for people, JSON for scripts, one
//! line per log line. Pure functions from a reply to a `String`; writing it
//! out is the caller's. The JSON shapes are a public contract, like the
//! CLI's flags.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bext_proto::control::v1::{AppStatus, LogLine, StatusReply, Version, VersionsReply};
use serde::Serialize;

/// What an empty cell shows.
const NONE: &str = "-";
/// The latest time `humantime` formats (9999-12-31T23:59:59Z).
const MAX_UNIX_SECS: u64 = 253_402_300_799;

/// `bextctl status`: a row per app under one header, the app's workers
/// (and what it is doing, if anything) indented below it.
pub fn status_table(reply: &StatusReply) -> String {
    if reply.apps.is_empty() {
        return "no apps\n".to_string();
    }
    let mut rows = vec![
        [
            "NAME",
            "STATE",
            "VERSION",
            "FRAMEWORK",
            "RESTARTS",
            "DOMAINS",
        ]
        .map(String::from),
    ];
    for app in &reply.apps {
        rows.push([
            cell(&app.name),
            cell(&app.state),
            cell(&app.version),
            cell(&app.framework),
            app.restarts.to_string(),
            cell(&app.domains.join(",")),
        ]);
    }
    let widths = widths(&rows);
    let mut out = line(&rows[0], &widths);
    for (app, row) in reply.apps.iter().zip(&rows[1..]) {
        out.push_str(&line(row, &widths));
        if !app.detail.is_empty() {
            out.push_str(&format!("  {}\n", app.detail));
        }
        out.push_str(&workers(app));
        out.push_str(&certificates(app));
    }
    out
}

/// An app's certificates, one indented line each.
fn certificates(app: &AppStatus) -> String {
    app.certificates
        .iter()
        .map(|c| {
            let until = if c.not_after > 0 {
                format!("valid until {}", rfc3339(c.not_after))
            } else {
                "none yet".to_string()
            };
            let problem = if c.problem.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.problem)
            };
            format!("  certificate {} {} {until}{problem}\n", c.domain, c.source)
        })
        .collect()
}

/// An app's workers, one indented line each, aligned among themselves.
fn workers(app: &AppStatus) -> String {
    let rows: Vec<[String; 5]> = app
        .workers
        .iter()
        .map(|w| {
            [
                format!("worker {}", w.index),
                format!(
                    "pid {}",
                    if w.pid == 0 {
                        NONE.to_string()
                    } else {
                        w.pid.to_string()
                    }
                ),
                cell(&w.state),
                format!("inflight {}", w.inflight),
                format!("rss {}", mib(w.rss_bytes)),
            ]
        })
        .collect();
    let widths = widths(&rows);
    rows.iter()
        .map(|row| format!("  {}", line(row, &widths)))
        .collect()
}

/// `bextctl versions`: newest first, as the server orders them.
pub fn versions_table(reply: &VersionsReply) -> String {
    if reply.versions.is_empty() {
        return format!("{} has no versions\n", reply.app);
    }
    let mut rows = vec![["ID", "STATE", "CREATED", "REASON"].map(String::from)];
    for v in &reply.versions {
        rows.push([
            cell(&v.id),
            cell(&v.state),
            if v.created > 0 {
                rfc3339(v.created)
            } else {
                NONE.to_string()
            },
            v.reason.clone(),
        ]);
    }
    let widths = widths(&rows);
    rows.iter().map(|row| line(row, &widths)).collect()
}

/// `bextctl status --json`.
pub fn status_json(reply: &StatusReply) -> String {
    #[derive(Serialize)]
    struct Status<'a> {
        apps: Vec<App<'a>>,
    }
    #[derive(Serialize)]
    struct App<'a> {
        name: &'a str,
        state: &'a str,
        version: &'a str,
        dir: &'a str,
        framework: &'a str,
        restarts: u64,
        domains: &'a [String],
        detail: &'a str,
        /// The operation under way (deploy, rollback, ...), null when none.
        operation: Option<&'a str>,
        workers: Vec<Worker<'a>>,
        certificates: Vec<Certificate<'a>>,
    }
    #[derive(Serialize)]
    struct Certificate<'a> {
        domain: &'a str,
        /// "files" or "acme".
        source: &'a str,
        /// RFC 3339, null while an ACME domain has none.
        not_after: Option<String>,
        /// The last ACME failure, null when none.
        problem: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Worker<'a> {
        index: u32,
        pid: Option<u32>,
        state: &'a str,
        inflight: u32,
        rss_bytes: u64,
    }
    let status = Status {
        apps: reply
            .apps
            .iter()
            .map(|a| App {
                name: &a.name,
                state: &a.state,
                version: &a.version,
                dir: &a.dir,
                framework: &a.framework,
                restarts: a.restarts,
                domains: &a.domains,
                detail: &a.detail,
                operation: Some(a.operation.as_str()).filter(|o| !o.is_empty()),
                workers: a
                    .workers
                    .iter()
                    .map(|w| Worker {
                        index: w.index,
                        pid: (w.pid != 0).then_some(w.pid),
                        state: &w.state,
                        inflight: w.inflight,
                        rss_bytes: w.rss_bytes,
                    })
                    .collect(),
                certificates: a
                    .certificates
                    .iter()
                    .map(|c| Certificate {
                        domain: &c.domain,
                        source: &c.source,
                        not_after: (c.not_after > 0).then(|| rfc3339(c.not_after)),
                        problem: Some(c.problem.as_str()).filter(|p| !p.is_empty()),
                    })
                    .collect(),
            })
            .collect(),
    };
    json(&status)
}

/// `bextctl versions --json`.
pub fn versions_json(reply: &VersionsReply) -> String {
    #[derive(Serialize)]
    struct Versions<'a> {
        app: &'a str,
        versions: Vec<V<'a>>,
    }
    #[derive(Serialize)]
    struct V<'a> {
        id: &'a str,
        state: &'a str,
        /// `null` when unknown (the configured `source`).
        created: Option<String>,
        reason: &'a str,
        digest: &'a str,
        build_log: &'a str,
        dir: &'a str,
    }
    let versions = Versions {
        app: &reply.app,
        versions: reply
            .versions
            .iter()
            .map(|v: &Version| V {
                id: &v.id,
                state: &v.state,
                created: (v.created > 0).then(|| rfc3339(v.created)),
                reason: &v.reason,
                digest: &v.digest,
                build_log: &v.build_log,
                dir: &v.dir,
            })
            .collect(),
    };
    json(&versions)
}

/// `bextctl logs`: `[worker W pid P] line`, or `[bext] line` for the
/// supervisor's own notes about the app.
pub fn log_line(line: &LogLine) -> String {
    if line.stream == "bext" {
        format!("[bext] {}\n", line.line)
    } else {
        format!("[worker {} pid {}] {}\n", line.worker, line.pid, line.line)
    }
}

fn json(value: &impl Serialize) -> String {
    // Plain structs of strings and numbers: serializing cannot fail.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Unix seconds as RFC 3339 UTC, clamped to what can be written.
fn rfc3339(unix_secs: i64) -> String {
    let secs = u64::try_from(unix_secs).unwrap_or(0).min(MAX_UNIX_SECS);
    let time: SystemTime = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Bytes in MiB, one decimal: worker memory is read in MiB, and one unit
/// keeps a column comparable (which `bytesize`'s adaptive units would not).
fn mib(bytes: u64) -> String {
    if bytes == 0 {
        return NONE.to_string();
    }
    #[allow(clippy::cast_precision_loss, reason = "a display value")]
    let mib = bytes as f64 / f64::from(1u32 << 20);
    format!("{mib:.1} MiB")
}

fn cell(text: &str) -> String {
    if text.is_empty() {
        NONE.to_string()
    } else {
        text.to_string()
    }
}

fn widths<const N: usize>(rows: &[[String; N]]) -> [usize; N] {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

/// Cells padded to their column and two spaces apart; the last is not
/// padded.
fn line<const N: usize>(row: &[String; N], widths: &[usize; N]) -> String {
    let mut out = String::new();
    for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
        if i + 1 == N {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:<width$}  "));
        }
    }
    let mut out = out.trim_end().to_string();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use bext_proto::control::v1::{
        AppStatus, LogLine, StatusReply, Version, VersionsReply, WorkerStatus,
    };

    use super::{log_line, status_json, status_table, versions_json, versions_table};

    fn status() -> StatusReply {
        StatusReply {
            apps: vec![
                AppStatus {
                    name: "marketing".into(),
                    framework: "nextjs".into(),
                    state: "running".into(),
                    version: "20250101-120000-ab12".into(),
                    dir: "/var/lib/bext/apps/marketing/v".into(),
                    restarts: 2,
                    domains: vec!["example.com".into(), "www.example.com".into()],
                    workers: vec![
                        WorkerStatus {
                            index: 0,
                            pid: 1234,
                            state: "ready".into(),
                            inflight: 0,
                            rss_bytes: 47_290_777,
                        },
                        WorkerStatus {
                            index: 1,
                            pid: 0,
                            state: "stopped".into(),
                            inflight: 12,
                            rss_bytes: 0,
                        },
                    ],
                    certificates: vec![
                        bext_proto::control::v1::CertificateStatus {
                            domain: "example.com".into(),
                            source: "acme".into(),
                            not_after: 1_767_225_600,
                            problem: String::new(),
                        },
                        bext_proto::control::v1::CertificateStatus {
                            domain: "www.example.com".into(),
                            source: "acme".into(),
                            not_after: 0,
                            problem: "validation failed: connection refused".into(),
                        },
                    ],
                    ..AppStatus::default()
                },
                AppStatus {
                    name: "api".into(),
                    framework: "hono".into(),
                    state: "failed".into(),
                    detail: "npm ci exited with status 1".into(),
                    ..AppStatus::default()
                },
            ],
        }
    }

    #[test]
    fn status_as_a_table() {
        assert_eq!(
            status_table(&status()),
            "\
NAME       STATE    VERSION               FRAMEWORK  RESTARTS  DOMAINS
marketing  running  20250101-120000-ab12  nextjs     2         example.com,www.example.com
  worker 0  pid 1234  ready    inflight 0   rss 45.1 MiB
  worker 1  pid -     stopped  inflight 12  rss -
  certificate example.com acme valid until 2026-01-01T00:00:00Z
  certificate www.example.com acme none yet (validation failed: connection refused)
api        failed   -                     hono       0         -
  npm ci exited with status 1
"
        );
        assert_eq!(status_table(&StatusReply::default()), "no apps\n");
    }

    #[test]
    fn status_as_json() {
        let value: serde_json::Value =
            serde_json::from_str(&status_json(&status())).expect("valid JSON");
        let app = &value["apps"][0];
        assert_eq!(app["name"], "marketing");
        assert_eq!(app["domains"][1], "www.example.com");
        assert_eq!(app["restarts"], 2);
        assert_eq!(app["workers"][0]["pid"], 1234);
        assert_eq!(app["workers"][0]["rss_bytes"], 47_290_777);
        assert!(app["workers"][1]["pid"].is_null());
        assert_eq!(app["certificates"][0]["not_after"], "2026-01-01T00:00:00Z");
        assert!(app["certificates"][0]["problem"].is_null());
        assert!(app["certificates"][1]["not_after"].is_null());
        assert_eq!(
            app["certificates"][1]["problem"],
            "validation failed: connection refused"
        );
        let keys: Vec<&String> = value["apps"][1]
            .as_object()
            .expect("object")
            .keys()
            .collect();
        assert_eq!(
            keys,
            [
                "certificates",
                "detail",
                "dir",
                "domains",
                "framework",
                "name",
                "operation",
                "restarts",
                "state",
                "version",
                "workers"
            ]
        );
    }

    fn versions() -> VersionsReply {
        VersionsReply {
            app: "blog".into(),
            versions: vec![
                Version {
                    id: "v3".into(),
                    state: "failed".into(),
                    created: 1_735_732_800,
                    reason: "health check timed out".into(),
                    digest: "ab".into(),
                    build_log: "/logs/v3".into(),
                    dir: "/apps/blog/v3".into(),
                },
                Version {
                    id: "v2".into(),
                    state: "active".into(),
                    created: 1_735_646_400,
                    ..Version::default()
                },
            ],
        }
    }

    #[test]
    fn versions_as_a_table() {
        assert_eq!(
            versions_table(&versions()),
            "\
ID  STATE   CREATED               REASON
v3  failed  2025-01-01T12:00:00Z  health check timed out
v2  active  2024-12-31T12:00:00Z
"
        );
    }

    #[test]
    fn versions_as_json() {
        let value: serde_json::Value =
            serde_json::from_str(&versions_json(&versions())).expect("valid JSON");
        assert_eq!(
            value,
            serde_json::json!({
                "app": "blog",
                "versions": [
                    {"id": "v3", "state": "failed", "created": "2025-01-01T12:00:00Z",
                     "reason": "health check timed out", "digest": "ab",
                     "build_log": "/logs/v3", "dir": "/apps/blog/v3"},
                    {"id": "v2", "state": "active", "created": "2024-12-31T12:00:00Z",
                     "reason": "", "digest": "", "build_log": "", "dir": ""},
                ]
            })
        );
    }

    #[test]
    fn log_lines() {
        let mut line = LogLine {
            worker: 1,
            pid: 42,
            stream: "stderr".into(),
            line: "listening".into(),
            ..LogLine::default()
        };
        assert_eq!(log_line(&line), "[worker 1 pid 42] listening\n");
        line.stream = "bext".into();
        assert_eq!(log_line(&line), "[bext] listening\n");
    }
}
