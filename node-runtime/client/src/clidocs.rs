//! Shell completions and man pages generated from a binary's clap definition, so they never
//! drift from the flags (the Debian package ships what these write).

use std::io;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The completion script for `shell`, as `name` is invoked.
pub fn completion_script(mut cmd: clap::Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// Writes `NAME.1` and one `NAME-SUBCOMMAND.1` per visible subcommand into `dir` (created if
/// missing) and returns the files written, sorted.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let ctx = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(ctx(format!("create {}", dir.display())))?;
    // The help subcommand is clap's own; it needs no page.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)?;
    written.sort();
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(&path, page)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display())))?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("demo")
            .version("1.0")
            .about("A demo")
            .arg(
                clap::Arg::new("verbose")
                    .long("verbose")
                    .action(clap::ArgAction::SetTrue),
            )
            .subcommand(clap::Command::new("run").about("Run it"))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion_script(sample(), shell)).unwrap();
            assert!(script.contains("run"), "{shell}: {script}");
            assert!(script.contains("verbose"), "{shell}: {script}");
        }
    }

    #[test]
    fn man_pages_cover_visible_subcommands_only() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(sample(), dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo-run.1", "demo.1"]);
        let top = std::fs::read_to_string(dir.path().join("demo.1")).unwrap();
        assert!(top.starts_with(".ie"), "{top}");
        assert!(top.contains(".TH demo 1"), "{top}");
        assert!(top.contains("verbose"), "{top}");
    }
}
