//! Packing an app's source directory for `bextctl deploy`: a gzip'd tar,
//! cut into upload-sized chunks as it is written, so the archive is held
//! once in memory and never on disk.
//!
//! What goes in: what `.gitignore` and `.bextignore` let through (even
//! outside a git repository), hidden files included, never `node_modules`,
//! `.next` or `.git`, except the top-level `node_modules` and `.next`
//! when asked for (whole, whatever the ignore files say). Paths are relative to the directory;
//! symlinks are stored as symlinks; sockets, pipes and devices are left
//! out. Headers are deterministic (no owners or times, sorted walk), so the
//! same tree packs to the same bytes and the server's digest means "same
//! source". This module reads the file system only; it knows nothing of
//! gRPC.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use ignore::WalkBuilder;

/// Largest archive `bextctl deploy` uploads.
pub const MAX_ARCHIVE_BYTES: u64 = 1 << 30;
/// Bytes of archive per upload message.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// What to pack, beyond the ignore files.
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub include_node_modules: bool,
    /// Include `.next` (a local build's output).
    pub include_build: bool,
    /// Refuse archives larger than this (compressed).
    pub max_bytes: u64,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            include_node_modules: false,
            include_build: false,
            max_bytes: MAX_ARCHIVE_BYTES,
        }
    }
}

/// A packed directory.
#[derive(Debug)]
pub struct Packed {
    /// The archive, in upload-sized chunks.
    pub chunks: Vec<Vec<u8>>,
    /// Compressed size.
    pub bytes: u64,
    /// Regular files and symlinks.
    pub files: usize,
    /// Entries that are neither files, directories nor symlinks.
    pub skipped: Vec<PathBuf>,
    /// Ignore-file problems that did not stop the walk (a bad pattern).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("could not pack {}: not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("could not read {}: {source}", dir.display())]
    Walk { dir: PathBuf, source: ignore::Error },
    #[error("could not archive {}: {source}", path.display())]
    Append { path: PathBuf, source: io::Error },
    #[error("could not compress the archive: {0}")]
    Compress(io::Error),
    #[error(
        "the archive of {} is larger than {} MiB: add what the server does not need to .bextignore",
        dir.display(),
        max >> 20
    )]
    TooLarge { dir: PathBuf, max: u64 },
}

/// Packs `dir`.
pub fn pack(dir: &Path, options: &PackOptions) -> Result<Packed, PackError> {
    if !dir.is_dir() {
        return Err(PackError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    // `node_modules` and `.next` are left out of the walk that honours the
    // ignore files (they nearly always list them); when asked for, the
    // top-level ones are walked on their own, whole.
    let skip = [".git", "node_modules", ".next"].map(OsStr::new);
    let mut walk = WalkBuilder::new(dir);
    walk.hidden(false)
        .require_git(false)
        // Only the ignore files the contract names: not ripgrep's `.ignore`.
        .ignore(false)
        .add_custom_ignore_filename(".bextignore")
        .follow_links(false)
        .sort_by_file_name(OsStr::cmp)
        .filter_entry(move |entry| !skip.iter().any(|name| *name == entry.file_name()));

    let writer = ChunkWriter::new(options.max_bytes);
    let mut tar = tar::Builder::new(GzEncoder::new(writer, Compression::default()));
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);

    let mut files = 0;
    let mut skipped = Vec::new();
    let mut warnings = Vec::new();
    let mut walks = vec![walk.build()];
    for (name, wanted) in [
        ("node_modules", options.include_node_modules),
        (".next", options.include_build),
    ] {
        if wanted && dir.join(name).is_dir() {
            walks.push(
                WalkBuilder::new(dir.join(name))
                    .standard_filters(false)
                    .follow_links(false)
                    .sort_by_file_name(OsStr::cmp)
                    .build(),
            );
        }
    }
    for entry in walks.into_iter().flatten() {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.is_io() => {
                return Err(PackError::Walk {
                    dir: dir.to_path_buf(),
                    source: e,
                });
            }
            Err(e) => {
                warnings.push(e.to_string());
                continue;
            }
        };
        if entry.depth() == 0 && entry.path() == dir {
            continue;
        }
        let Some(name) = archive_name(dir, entry.path()) else {
            skipped.push(entry.path().to_path_buf());
            continue;
        };
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            skipped.push(entry.path().to_path_buf());
            continue;
        }
        if let Err(source) = tar.append_path_with_name(entry.path(), &name) {
            return Err(too_large(dir, options, &tar).unwrap_or(PackError::Append {
                path: entry.path().to_path_buf(),
                source,
            }));
        }
        if !kind.is_dir() {
            files += 1;
        }
    }
    let finished = tar.into_inner().and_then(GzEncoder::finish);
    let writer = match finished {
        Ok(writer) => writer,
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Err(PackError::TooLarge {
                dir: dir.to_path_buf(),
                max: options.max_bytes,
            });
        }
        Err(e) => return Err(PackError::Compress(e)),
    };
    let bytes = writer.total;
    Ok(Packed {
        chunks: writer.into_chunks(),
        bytes,
        files,
        skipped,
        warnings,
    })
}

/// `path`'s name in the archive: relative to `dir`, plain components only
/// (no root, no `..`), so it unpacks inside wherever it is unpacked.
fn archive_name(dir: &Path, path: &Path) -> Option<PathBuf> {
    let relative = path.strip_prefix(dir).ok()?;
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    (plain && !relative.as_os_str().is_empty()).then(|| relative.to_path_buf())
}

/// The size error, if the writer stopped because of the size limit (tar
/// wraps the writer's error with the path it was writing).
fn too_large(
    dir: &Path,
    options: &PackOptions,
    tar: &tar::Builder<GzEncoder<ChunkWriter>>,
) -> Option<PackError> {
    (tar.get_ref().get_ref().total_tried > options.max_bytes).then(|| PackError::TooLarge {
        dir: dir.to_path_buf(),
        max: options.max_bytes,
    })
}

/// Collects compressed bytes into [`CHUNK_BYTES`] pieces, and refuses to
/// grow past a limit.
#[derive(Debug)]
struct ChunkWriter {
    chunks: Vec<Vec<u8>>,
    current: Vec<u8>,
    total: u64,
    /// `total` plus the write that was refused, if one was.
    total_tried: u64,
    max: u64,
}

impl ChunkWriter {
    fn new(max: u64) -> Self {
        Self {
            chunks: Vec::new(),
            current: Vec::with_capacity(CHUNK_BYTES),
            total: 0,
            total_tried: 0,
            max,
        }
    }

    fn into_chunks(mut self) -> Vec<Vec<u8>> {
        if !self.current.is_empty() || self.chunks.is_empty() {
            self.chunks.push(self.current);
        }
        self.chunks
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let len = buf.len();
        self.total_tried = self.total + len as u64;
        if self.total_tried > self.max {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the archive is too large",
            ));
        }
        while !buf.is_empty() {
            let room = CHUNK_BYTES - self.current.len();
            let (now, later) = buf.split_at(room.min(buf.len()));
            self.current.extend_from_slice(now);
            buf = later;
            if self.current.len() == CHUNK_BYTES {
                let full = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK_BYTES));
                self.chunks.push(full);
            }
        }
        self.total += len as u64;
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Read;
    use std::path::Path;

    use flate2::read::GzDecoder;

    use super::{CHUNK_BYTES, PackError, PackOptions, Packed, pack};

    /// A source tree with one of everything the packer must judge.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        // As nearly every app's does, it lists node_modules and .next.
        write(".gitignore", "*.log\n/dist\nnode_modules\n.next\n");
        write(".bextignore", "secrets.txt\n");
        write("package.json", "{}");
        write("server.js", "console.log('hi')");
        write("debug.log", "ignored by .gitignore");
        write("dist/out.js", "ignored by .gitignore");
        write("secrets.txt", "ignored by .bextignore");
        write("src/lib/util.js", "export {}");
        write("src/lib/trace.log", "ignored by .gitignore, nested");
        write(".env.example", "hidden, kept");
        write("node_modules/left-pad/index.js", "optional");
        write(
            "src/node_modules/x.js",
            "never: only the top-level one is asked for",
        );
        write(".next/BUILD_ID", "optional");
        write(".git/HEAD", "ignored, always");
        std::os::unix::fs::symlink("server.js", root.join("main.js")).expect("symlink");
        std::os::unix::fs::symlink("/nowhere", root.join("dangling")).expect("symlink");
        dir
    }

    /// The archive's entries: name → (type, symlink target).
    fn unpack(packed: &Packed) -> BTreeMap<String, (tar::EntryType, Option<String>)> {
        let bytes: Vec<u8> = packed.chunks.concat();
        assert_eq!(bytes.len() as u64, packed.bytes);
        let mut archive = tar::Archive::new(GzDecoder::new(bytes.as_slice()));
        let mut entries = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            assert!(
                !name.starts_with('/') && !name.split('/').any(|c| c == ".."),
                "{name}"
            );
            let kind = entry.header().entry_type();
            let target = entry
                .link_name()
                .expect("link name")
                .map(|t| t.to_string_lossy().into_owned());
            if kind.is_file() {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("read");
                assert!(
                    !String::from_utf8_lossy(&data).contains("ignored"),
                    "{name}"
                );
            }
            entries.insert(name.trim_end_matches('/').to_string(), (kind, target));
        }
        entries
    }

    #[test]
    fn packs_what_the_ignore_files_let_through() {
        let dir = tree();
        let packed = pack(dir.path(), &PackOptions::default()).expect("packs");
        let entries = unpack(&packed);
        let names: Vec<&str> = entries.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                ".bextignore",
                ".env.example",
                ".gitignore",
                "dangling",
                "main.js",
                "package.json",
                "server.js",
                "src",
                "src/lib",
                "src/lib/util.js",
            ]
        );
        assert_eq!(entries["src"].0, tar::EntryType::Directory);
        assert_eq!(entries["server.js"].0, tar::EntryType::Regular);
        assert_eq!(
            entries["main.js"],
            (tar::EntryType::Symlink, Some("server.js".to_string()))
        );
        assert_eq!(
            entries["dangling"],
            (tar::EntryType::Symlink, Some("/nowhere".to_string()))
        );
        assert_eq!(packed.files, 8);
        assert!(packed.skipped.is_empty() && packed.warnings.is_empty());
    }

    #[test]
    fn includes_node_modules_and_build_when_asked() {
        let dir = tree();
        let options = PackOptions {
            include_node_modules: true,
            include_build: true,
            ..PackOptions::default()
        };
        let entries = unpack(&pack(dir.path(), &options).expect("packs"));
        for name in ["node_modules/left-pad/index.js", ".next/BUILD_ID"] {
            assert!(entries.contains_key(name), "{name} missing");
        }
        assert!(!entries.contains_key("src/node_modules/x.js"));
        assert_eq!(
            entries
                .keys()
                .filter(|n| n.starts_with("node_modules"))
                .count(),
            3,
            "node_modules, left-pad and its file, each once: {entries:?}"
        );
        assert!(
            !entries
                .keys()
                .any(|n| n.starts_with(".git/") || n == ".git")
        );
    }

    #[test]
    fn same_tree_same_bytes() {
        let dir = tree();
        let a = pack(dir.path(), &PackOptions::default()).expect("packs");
        let b = pack(dir.path(), &PackOptions::default()).expect("packs");
        assert_eq!(a.chunks, b.chunks);
    }

    #[test]
    fn cuts_into_chunks() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Incompressible, so the archive spans several chunks.
        let mut noise = Vec::with_capacity(3 * CHUNK_BYTES);
        let mut x: u32 = 0x9e37_79b9;
        while noise.len() < 3 * CHUNK_BYTES {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        fs::write(dir.path().join("noise.bin"), &noise).expect("write");
        let packed = pack(dir.path(), &PackOptions::default()).expect("packs");
        assert!(packed.chunks.len() >= 3, "{} chunks", packed.chunks.len());
        let (last, full) = packed.chunks.split_last().expect("chunks");
        assert!(full.iter().all(|c| c.len() == CHUNK_BYTES));
        assert!(!last.is_empty() && last.len() <= CHUNK_BYTES);
        assert_eq!(unpack(&packed).len(), 1);
    }

    #[test]
    fn refuses_an_archive_over_the_limit() {
        let dir = tree();
        let options = PackOptions {
            max_bytes: 64,
            ..PackOptions::default()
        };
        let err = pack(dir.path(), &options).expect_err("too large");
        assert!(matches!(err, PackError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn refuses_a_file() {
        let dir = tree();
        let err = pack(&dir.path().join("server.js"), &PackOptions::default()).expect_err("a file");
        assert!(matches!(err, PackError::NotADirectory { .. }), "{err}");
        let err =
            pack(Path::new("/nonexistent/bext"), &PackOptions::default()).expect_err("absent");
        assert!(matches!(err, PackError::NotADirectory { .. }), "{err}");
    }
}
