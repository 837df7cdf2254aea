//! Config files an operator (or, for `bext.config.toml`, a tenant) writes:
//! errors, never panics, and every error names where it is.
#![no_main]

use std::path::Path;

use bext::config::Config;
use bext::config::platform::PlatformConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new("/srv/app/bext.config.toml"), text) {
        assert!(e.to_string().contains("bext.config.toml"), "{e}");
    }
    if let Err(e) = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), text) {
        assert!(e.to_string().contains("platform.toml"), "{e}");
    }
});
