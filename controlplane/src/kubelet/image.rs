//! Images are labels: this kubelet pulls nothing. An image map (the
//! kubelet's `--image-map FILE`) says what a container of each image runs:
//!
//! ```text
//! # pattern                  = target
//! localhost/riptide:0.1.0    = /opt/riptide/bin   # the image's /usr/local/bin
//! registry.k8s.io/pause:*    = pause              # built-in: sleep forever
//! riptide.local/*            = host               # the node's filesystem
//! ```
//!
//! A pattern is an image reference as the pod spells it, exact or ending in
//! `*` (a prefix); the first matching line wins. Targets:
//! - a directory: the image's binaries. The container sees it, read-only,
//!   at `/usr/local/bin` (where `manifests/image/Containerfile` installs
//!   them), first in `PATH`, so `command: ["riptide-agent"]` and a path such
//!   as `/usr/local/bin/riptide-cni` work as in the real image.
//! - `pause`: the pause image; a container without `command`/`args` runs
//!   `sleep infinity` from the node's filesystem.
//! - `host`: no image at all, `command` runs from the node's filesystem.
//!
//! An image no line matches is not run: the container waits with reason
//! `ErrImagePull`, then `ImagePullBackOff`, as a kubelet that cannot pull
//! it. Without `--image-map` the built-in map is `pause` for
//! `registry.k8s.io/pause:*` and `host` for every other image.

use std::path::{Path, PathBuf};

use super::Error;

/// What a container of an image runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// The image's binaries, shown at [`IMAGE_BIN_DIR`].
    Dir(PathBuf),
    /// The built-in pause container.
    Pause,
    /// The node's filesystem.
    Host,
}

/// Where an image directory appears in its containers.
pub const IMAGE_BIN_DIR: &str = "/usr/local/bin";

/// The argv of a pause container without a command.
pub fn pause_argv() -> Vec<String> {
    vec!["sleep".into(), "infinity".into()]
}

#[derive(Debug, Clone)]
pub struct ImageMap {
    entries: Vec<(String, Image)>,
}

impl Default for ImageMap {
    fn default() -> Self {
        Self { entries: vec![("registry.k8s.io/pause:*".into(), Image::Pause), ("*".into(), Image::Host)] }
    }
}

impl ImageMap {
    /// Parses the file format above; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let mut entries = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| Error::Setup {
                what: format!("{origin} line {}: {why}: {raw:?}", n + 1),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            };
            let (pattern, target) = line.split_once('=').ok_or_else(|| bad("expected `image = target`"))?;
            let (pattern, target) = (pattern.trim(), target.trim());
            if pattern.is_empty() || target.is_empty() {
                return Err(bad("empty image or target"));
            }
            if pattern.find('*').is_some_and(|i| i != pattern.len() - 1) {
                return Err(bad("`*` may only end a pattern"));
            }
            let image = match target {
                "pause" => Image::Pause,
                "host" => Image::Host,
                dir if dir.starts_with('/') => Image::Dir(PathBuf::from(dir)),
                _ => return Err(bad("target must be an absolute directory, `pause` or `host`")),
            };
            entries.push((pattern.to_owned(), image));
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Setup { what: format!("reading image map {}", path.display()), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// What `image` runs, or the `ErrImagePull` message.
    pub fn resolve(&self, image: &str) -> Result<&Image, String> {
        self.entries
            .iter()
            .find(|(p, _)| p.strip_suffix('*').map_or(p == image, |prefix| image.starts_with(prefix)))
            .map(|(_, i)| i)
            .ok_or_else(|| {
                format!("failed to pull image \"{image}\": riptide's kubelet pulls no images and its image map has no entry for it")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_and_unknown_images_fail() {
        let m = ImageMap::parse(
            "# lab\nlocalhost/riptide:0.1.0 = /opt/rt/bin\nregistry.k8s.io/pause:* = pause # sleep\nriptide.local/* = host\n",
            "map",
        )
        .expect("parses");
        assert_eq!(m.resolve("localhost/riptide:0.1.0"), Ok(&Image::Dir("/opt/rt/bin".into())));
        assert_eq!(m.resolve("registry.k8s.io/pause:3.10"), Ok(&Image::Pause));
        assert_eq!(m.resolve("riptide.local/netexec:latest"), Ok(&Image::Host));
        let err = m.resolve("localhost/riptide:0.2.0").expect_err("no entry");
        assert!(err.contains("localhost/riptide:0.2.0") && err.contains("image map"), "{err}");
        assert_eq!(ImageMap::default().resolve("busybox"), Ok(&Image::Host));
    }

    #[test]
    fn bad_lines_are_errors() {
        for bad in ["x", "a = relative/dir", "a*b = host", " = host"] {
            assert!(ImageMap::parse(bad, "m").is_err(), "{bad:?}");
        }
    }
}
