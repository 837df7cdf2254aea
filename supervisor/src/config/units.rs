//! Human-written sizes: `memory_limit = "256mb"`.
//!
//! Not `bytesize`: it reads "mb" as 10^6 bytes, while every tool our users
//! set memory limits with (Node's `--max-old-space-size`, Docker's `-m 256m`,
//! nginx, systemd's `MemoryMax=256M`) means 2^20. So bext reads k/m/g/t, with
//! or without a trailing "b" or "ib" and in any case, as powers of 1024, and
//! says so in the docs.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A size in bytes, written as `"256mb"`, `"1.5g"`, `"512MiB"` or a plain
/// integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(u64);

impl MemorySize {
    pub const fn from_bytes(bytes: u64) -> Self {
        MemorySize(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Whole mebibytes, rounded down, at least 1.
    pub fn mebibytes(self) -> u64 {
        (self.0 >> 20).max(1)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("tb", 1 << 40),
            ("gb", 1 << 30),
            ("mb", 1 << 20),
            ("kb", 1 << 10),
        ];
        for (name, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        write!(f, "{}b", self.0)
    }
}

impl std::str::FromStr for MemorySize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write it like \"256mb\" or \"1gb\""))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}`; use b, kb, mb, gb or tb"
                ));
            }
        };
        let bytes = number * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!("`{s}` is out of range"));
        }
        Ok(MemorySize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = MemorySize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"256mb\" or a number of bytes")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<MemorySize, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemorySize, E> {
                u64::try_from(v)
                    .ok()
                    .filter(|&v| v > 0)
                    .map(MemorySize)
                    .ok_or_else(|| E::custom("a size must be positive"))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_whatever_the_spelling() {
        for text in ["256mb", "256MB", "256m", "256MiB", "256 mb", "268435456"] {
            assert_eq!(
                text.parse::<MemorySize>(),
                Ok(MemorySize(256 << 20)),
                "{text}"
            );
        }
        assert_eq!("1.5g".parse::<MemorySize>(), Ok(MemorySize(3 << 29)));
        assert_eq!(MemorySize(256 << 20).to_string(), "256mb");
        assert_eq!(MemorySize(256 << 20).mebibytes(), 256);
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(
            "256xb"
                .parse::<MemorySize>()
                .expect_err("invalid")
                .contains("unknown size unit `xb`")
        );
        assert!(
            "lots"
                .parse::<MemorySize>()
                .expect_err("invalid")
                .contains("not a size")
        );
        assert!(
            "0mb"
                .parse::<MemorySize>()
                .expect_err("invalid")
                .contains("out of range")
        );
    }
}

/// The longest duration a config may name: 2^31 seconds (about 68 years),
/// the bound RFC 9111 §1.2.2 sets for delta-seconds. Anything longer is a
/// typo, and bounding it keeps every deadline computed from config
/// (`now + timeout`) far from overflowing.
pub const MAX_CONFIG_DURATION: std::time::Duration = std::time::Duration::from_secs(1 << 31);

fn bounded<E: de::Error>(
    duration: std::time::Duration,
    text: &str,
) -> Result<std::time::Duration, E> {
    if duration > MAX_CONFIG_DURATION {
        return Err(E::custom(format!(
            "`{text}` is too long; a duration may be at most 2147483648 s (about 68 years)"
        )));
    }
    Ok(duration)
}

/// A human-written duration: `"60s"`, `"5m"`, `"1h30m"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(text.trim()).map_err(|e| {
            de::Error::custom(format!(
                "`{text}` is not a duration ({e}); write it like \"60s\", \"5m\" or \"1h30m\""
            ))
        })?;
        bounded(duration, &text).map(HumanDuration)
    }
}

/// A duration written as whole milliseconds (`upstream_timeout_ms = 60000`),
/// at most [`MAX_CONFIG_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub std::time::Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ms = u64::deserialize(deserializer)?;
        bounded(std::time::Duration::from_millis(ms), &format!("{ms} ms")).map(Millis)
    }
}

/// A [`Millis`] that may not be 0 (a timeout of nothing would close every
/// connection at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveMillis(pub std::time::Duration);

impl<'de> Deserialize<'de> for PositiveMillis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Millis(d) = Millis::deserialize(deserializer)?;
        if d.is_zero() {
            return Err(de::Error::custom("must be more than 0"));
        }
        Ok(PositiveMillis(d))
    }
}

/// A [`HumanDuration`] that may not be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for PositiveDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let HumanDuration(d) = HumanDuration::deserialize(deserializer)?;
        if d.is_zero() {
            return Err(de::Error::custom("must be more than 0"));
        }
        Ok(PositiveDuration(d))
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations_read_as_humans_write_them() {
        let parse = |s: &str| serde_json::from_value::<HumanDuration>(serde_json::json!(s));
        assert_eq!(
            parse("60s").expect("60s").0,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(
            parse("1h30m").expect("1h30m").0,
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(
            parse("250ms").expect("ms").0,
            std::time::Duration::from_millis(250)
        );
        let err = parse("60x").expect_err("bad unit").to_string();
        assert!(err.contains("`60x` is not a duration"), "{err}");
    }

    #[test]
    fn durations_past_the_bound_are_refused() {
        let human = |s: &str| serde_json::from_value::<HumanDuration>(serde_json::json!(s));
        let err = human("100000000000s").expect_err("too long").to_string();
        assert!(err.contains("too long"), "{err}");
        assert!(human("68years").is_ok());
        let ms = |v: u64| serde_json::from_value::<Millis>(serde_json::json!(v));
        let err = ms(u64::MAX).expect_err("too long").to_string();
        assert!(err.contains("too long"), "{err}");
        assert_eq!(
            ms(1 << 40).expect("in range").0,
            std::time::Duration::from_millis(1 << 40)
        );
    }
}

/// Environment variables for an app's processes (`[runtime] env`,
/// `[apps.NAME.env]`): names of letters, digits and `_` not starting with a
/// digit, values without NUL; names starting with `BEXT_` are bext's own and
/// refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVars(pub std::collections::BTreeMap<String, String>);

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let vars = std::collections::BTreeMap::<String, String>::deserialize(deserializer)?;
        for (name, value) in &vars {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(de::Error::custom(format!(
                    "`{name}` is not an environment variable name (letters, digits and `_`)"
                )));
            }
            if name.to_ascii_uppercase().starts_with("BEXT_") {
                return Err(de::Error::custom(format!(
                    "`{name}`: names starting with BEXT_ are bext's own"
                )));
            }
            if value.contains('\0') {
                return Err(de::Error::custom(format!(
                    "the value of `{name}` contains a NUL byte"
                )));
            }
        }
        Ok(EnvVars(vars))
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn env_names_are_checked() {
        let parse = |v: serde_json::Value| serde_json::from_value::<EnvVars>(v);
        assert!(parse(serde_json::json!({"API_URL": "https://x", "_a1": ""})).is_ok());
        for bad in ["1A", "A-B", "", "BEXT_PURGE_TOKEN", "bext_x"] {
            let err = parse(serde_json::json!({ bad: "v" })).expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
        assert!(parse(serde_json::json!({"A": "x\u{0}y"})).is_err());
    }
}
