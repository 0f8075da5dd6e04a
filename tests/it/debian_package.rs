//! `scripts/package` builds a Debian package that installs, runs and goes away cleanly:
//! built here from the debug binary (no release build in CI) and installed into a
//! throw-away root with `dpkg --root`, never into the machine running the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ok(what: &str, out: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    // Maintainer scripts run outside the root with DPKG_ROOT set: the package's
    // scripts honour it, so nothing of the test machine is touched.
    Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args)
        .output()
        .unwrap()
}

/// A root with just what the maintainer scripts need: dpkg's database and the account
/// files `useradd --prefix` writes into.
fn throw_away_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in ["var/lib/dpkg/updates", "var/lib/dpkg/info", "etc"] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    for (file, text) in [
        ("var/lib/dpkg/status", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(r.join(file), text).unwrap();
    }
    root
}

/// The packages owning the shared libraries `binary` links (as `ldd` resolves them).
fn linked_packages(binary: &Path) -> Vec<String> {
    let ldd = ok("ldd", Command::new("ldd").arg(binary).output().unwrap());
    let mut packages = Vec::new();
    for path in ldd
        .lines()
        .filter_map(|l| l.split(" => ").nth(1))
        .filter_map(|r| r.split(" (").next())
        .filter(|p| p.starts_with('/'))
    {
        let owner = Command::new("dpkg").args(["-S", path]).output().unwrap();
        // A library reached through a /lib → /usr/lib link is known to dpkg by the
        // other name.
        let owner = if owner.status.success() {
            owner
        } else {
            let other = path
                .strip_prefix("/usr")
                .map_or(format!("/usr{path}"), str::to_owned);
            Command::new("dpkg").args(["-S", &other]).output().unwrap()
        };
        let text = ok(&format!("dpkg -S {path}"), owner);
        let package = text.split(':').next().unwrap().trim().to_owned();
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    packages
}

#[test]
fn the_debian_package_installs_into_a_throw_away_root_and_goes_away_cleanly() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        panic!("dpkg-deb is missing: scripts/install installs dpkg-dev");
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: dpkg --root cannot set the package's owners; skipped");
        return;
    }
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"));
    let out = tempfile::tempdir().unwrap();
    let built = ok(
        "scripts/package",
        Command::new(repo().join("scripts/package"))
            .arg("--binary")
            .arg(&binary)
            .arg("--out")
            .arg(out.path())
            .args(["--compression", "gzip"])
            .output()
            .unwrap(),
    );
    let deb = PathBuf::from(built.lines().last().unwrap().trim());
    assert!(deb.is_file(), "no package at {}", deb.display());

    // Depends names the package of every library the binary links.
    let depends = ok(
        "dpkg-deb --field",
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg("Depends")
            .output()
            .unwrap(),
    );
    let linked = linked_packages(&binary);
    for needed in ["libssl3", "libc6"] {
        assert!(
            linked.iter().any(|p| p.starts_with(needed)),
            "ldd: {linked:?}"
        );
    }
    for package in &linked {
        let name = package.split(':').next().unwrap();
        assert!(
            depends.split([',', ' ']).any(|d| d == name),
            "Depends ({}) lacks {name}, which the binary links",
            depends.trim()
        );
    }

    let root = throw_away_root();
    let r = root.path();
    ok("dpkg -i", dpkg(r, &["-i", deb.to_str().unwrap()]));

    // The binary runs.
    let version = ok(
        "outbox-relay --version",
        Command::new(r.join("usr/bin/outbox-relay"))
            .arg("--version")
            .output()
            .unwrap(),
    );
    assert_eq!(
        version.trim(),
        format!("outbox-relay {}", env!("CARGO_PKG_VERSION"))
    );
    // The system user, and the configuration readable by it alone.
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("outbox-relay:"))
        .unwrap_or_else(|| panic!("no system user in {passwd}"));
    assert!(user.ends_with(":/nonexistent:/usr/sbin/nologin"), "{user}");
    let gid: u32 = user.split(':').nth(3).unwrap().parse().unwrap();
    assert!(gid < 1000, "a system group: {user}");
    let config = r.join("etc/outbox-relay/relay.toml");
    let meta = std::fs::metadata(&config).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (0, gid));
    outbox_relay::config::load_with_env(&config, Default::default())
        .unwrap_or_else(|e| panic!("the packaged configuration: {e}"));
    let status = ok("dpkg -s", dpkg(r, &["-s", "outbox-relay"]));
    assert!(
        status.contains("Conffiles:\n /etc/outbox-relay/relay.toml "),
        "{status}"
    );
    // Every SQL file, the docs.
    for entry in std::fs::read_dir(repo().join("sql")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            r.join("usr/share/outbox-relay/sql").join(&name).is_file(),
            "{name:?} not packaged"
        );
    }
    for doc in [
        "README.md",
        "CHANGELOG.md",
        "copyright",
        "guide/configuration.md",
    ] {
        assert!(
            r.join("usr/share/doc/outbox-relay").join(doc).is_file(),
            "{doc}"
        );
    }
    // The hardened unit, run as the package's user, neither enabled nor started.
    let unit_path = r.join("lib/systemd/system/outbox-relay.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "ExecStart=/usr/bin/outbox-relay run --config /etc/outbox-relay/relay.toml",
        "User=outbox-relay",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestartPreventExitStatus=2 3",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    assert!(!unit.contains("DynamicUser"), "{unit}");
    assert!(
        !r.join("etc/systemd/system/multi-user.target.wants")
            .exists(),
        "the package enabled the unit"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        // Verified beside the packaged binary (verify checks that ExecStart exists).
        let units = tempfile::tempdir().unwrap();
        let copy = units.path().join("outbox-relay.service");
        let packaged_binary = r.join("usr/bin/outbox-relay");
        std::fs::write(
            &copy,
            unit.replace("/usr/bin/outbox-relay", packaged_binary.to_str().unwrap()),
        )
        .unwrap();
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let said = ok("systemd-analyze verify", verify);
        assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
    } else {
        eprintln!("systemd-analyze not installed: the unit is not verified");
    }

    // Removal keeps the edited configuration; purge takes it, and nothing stays but
    // the system user (Debian leaves those).
    std::fs::write(&config, "# edited\n").unwrap();
    ok("dpkg -r", dpkg(r, &["-r", "outbox-relay"]));
    assert!(!r.join("usr/bin/outbox-relay").exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# edited\n");
    ok("dpkg --purge", dpkg(r, &["--purge", "outbox-relay"]));
    let mut left = Vec::new();
    collect_files(r, r, &mut left);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Files under `dir` other than dpkg's database and the account files.
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        if rel.starts_with("var/lib/dpkg")
            || ["passwd", "group", "shadow", "gshadow"]
                .iter()
                .any(|f| rel.starts_with(&format!("etc/{f}")))
        {
            continue;
        }
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            out.push(rel);
        }
    }
}
