//! `bext check`: validate the config and detect the app without starting
//! anything (systemd runs it as ExecStartPre).

use crate::app;
use crate::cli::CheckArgs;
use crate::run::{RunError, load_config};

/// What `bext check` found, for the caller to print.
#[derive(Debug)]
pub struct Report {
    pub config: String,
    pub app: String,
}

pub fn check(args: &CheckArgs) -> Result<Report, RunError> {
    if let Some(file) = &args.config {
        let text =
            std::fs::read_to_string(file).map_err(|source| crate::config::ConfigError::Read {
                path: file.clone(),
                source,
            })?;
        if crate::config::platform::is_platform_file(&text) {
            let mut lines = crate::serve::check(file)?.into_iter();
            return Ok(Report {
                config: lines.next().unwrap_or_default(),
                app: lines.collect::<Vec<_>>().join("\n"),
            });
        }
    }
    let config = load_config(&args.dir, args.config.as_deref())?;
    let mut config_line = match &config.source {
        Some(path) => format!("{}: ok", path.display()),
        None => format!(
            "{}: no {}; defaults apply",
            args.dir.display(),
            crate::config::CONFIG_FILE_NAME
        ),
    };
    // Edge mode: whether Redis answers now (not an error: bext starts and
    // serves without it, sharing once it answers).
    let redis = match &config.redis {
        Some(redis) => Some(redis.clone()),
        None => crate::config::redis_from_env().map_err(RunError::Redis)?,
    };
    if let Some(redis) = redis {
        config_line.push('\n');
        config_line.push_str(&redis_line(&redis.url));
    }
    let app_line = if args.config.is_some() && !args.dir.exists() {
        String::new()
    } else {
        let app = app::detect(&args.dir, &config)?;
        format!(
            "app '{}': {} ({}), engine {}",
            app.name,
            app.framework,
            app.reason,
            app.engine.map_or("none".to_string(), |e| e.to_string())
        )
    };
    Ok(Report {
        config: config_line,
        app: app_line,
    })
}

/// "redis: HOST answers" or why not, without the URL's password.
pub(crate) fn redis_line(url: &str) -> String {
    let Ok(client) = redis::Client::open(url) else {
        return "redis: not a usable URL".to_string();
    };
    let at = client.get_connection_info().addr().to_string();
    let answer = client
        .get_connection_with_timeout(std::time::Duration::from_secs(2))
        .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
    match answer {
        Ok(_) => format!("redis: {at} answers (edge mode: the cache is shared)"),
        Err(e) => format!(
            "redis: {at} does not answer ({e}); bext will serve without sharing until it does"
        ),
    }
}
