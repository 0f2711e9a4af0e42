//! What the binaries share on their command line. Settings files (`fs-node`, `manager`),
//! and man pages and shell completions made from the flag definitions
//! ([`generate_if_asked`]). A settings file is TOML whose keys are
//! the binary's long flag names (`broker = "amqps://…"`, `pull-stall-secs = 30`,
//! `ignore = ["*.o", "build/"]`). Each key is taken as the flag's environment variable
//! when that variable is not set, before the command line is parsed: so a flag beats the
//! environment, which beats the file, which beats the built-in default, and the flags'
//! own definitions (and `--help`) stay the one description of every setting. Owns no
//! state: it reads the file and sets environment variables, once, at start-up.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The flag that names a settings file (also read from `env`).
pub const FLAG: &str = "config";

/// Which settings file to read: `--config FILE` on the command line, else the variable
/// `env`, else `default` if it exists; `None` when there is none.
pub fn chosen_file(args: &[String], env: &str, default: &Path) -> Option<PathBuf> {
    let long = format!("--{FLAG}");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if *a == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(v));
        }
    }
    if let Some(v) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    default.exists().then(|| default.to_path_buf())
}

/// The environment variable of every long flag of `cmd` and its subcommands.
fn flag_vars(cmd: &clap::Command, out: &mut BTreeMap<String, (String, Option<char>)>) {
    for a in cmd.get_arguments() {
        if let (Some(long), Some(env)) = (a.get_long(), a.get_env()) {
            out.insert(long.to_string(), (env.to_string_lossy().into_owned(), a.get_value_delimiter()));
        }
    }
    for s in cmd.get_subcommands() {
        flag_vars(s, out);
    }
}

/// The environment variables the settings in `text` stand for, with their values (`file`
/// names it in errors). An unknown key, or a value of the wrong shape, is an error: a
/// typo in a settings file must not be silently ignored.
pub fn settings(cmd: &clap::Command, text: &str, file: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let table: toml::Table = text.parse().with_context(|| format!("reading {} (TOML)", file.display()))?;
    let mut vars = BTreeMap::new();
    flag_vars(cmd, &mut vars);
    let mut out = Vec::new();
    for (key, value) in table {
        let Some((var, delimiter)) = vars.get(&key) else {
            bail!("{}: unknown setting `{key}` (known: {})", file.display(), vars.keys().cloned().collect::<Vec<_>>().join(", "));
        };
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => bail!("{}: `{key}` takes a string, a number or true/false", file.display()),
            })
        };
        let text = match (&value, delimiter) {
            (toml::Value::Array(items), Some(d)) => items.iter().map(scalar).collect::<anyhow::Result<Vec<_>>>()?.join(&d.to_string()),
            (toml::Value::Array(_), None) => bail!("{}: `{key}` takes one value, not a list", file.display()),
            (v, _) => scalar(v)?,
        };
        out.push((var.clone(), text));
    }
    Ok(out)
}

/// Reads the settings file the command line, `env` or `default` names (see
/// [`chosen_file`]) and sets the environment variables of its settings that are not set
/// already. Call first thing in `main`, before any thread starts.
pub fn apply(cmd: &clap::Command, env: &str, default: &Path) -> anyhow::Result<Option<PathBuf>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(file) = chosen_file(&args, env, default) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading the settings file {}", file.display()))?;
    for (var, value) in settings(cmd, &text, &file)? {
        if std::env::var_os(&var).is_none() {
            std::env::set_var(&var, value);
        }
    }
    Ok(Some(file))
}

/// The hidden flag that asks a binary for its man page or a shell's completions
/// (`--generate-cli man|bash|zsh|fish`; the packaging script uses it).
pub const GENERATE_FLAG: &str = "--generate-cli";

/// If the command line is `BIN --generate-cli WHAT`, prints the man page (`man`) or the
/// completion script of the shell `WHAT` for `cmd` and returns `Ok(true)`: the caller
/// exits. Made from the same definitions as `--help`.
pub fn generate_if_asked(cmd: clap::Command) -> anyhow::Result<bool> {
    let args: Vec<String> = std::env::args().collect();
    let Some(what) = args.get(1).filter(|a| *a == GENERATE_FLAG).and(args.get(2)) else {
        return Ok(false);
    };
    let mut out = std::io::stdout();
    match what.as_str() {
        "man" => clap_mangen::Man::new(cmd).render(&mut out)?,
        shell => {
            let shell: clap_complete::Shell = shell.parse().map_err(|e| anyhow::anyhow!("{GENERATE_FLAG}: {e} (man, bash, zsh, fish, elvish, powershell)"))?;
            let mut cmd = cmd;
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut out);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("broker").long("broker").env("T_BROKER"))
            .arg(Arg::new("stall").long("pull-stall-secs").env("T_STALL"))
            .arg(Arg::new("setid").long("allow-setid").env("T_SETID").action(ArgAction::SetTrue))
            .arg(Arg::new("ignore").long("ignore").env("T_IGNORE").value_delimiter('\n').action(ArgAction::Append))
            .subcommand(Command::new("serve").arg(Arg::new("db").long("db").env("T_DB")))
    }

    #[test]
    fn keys_become_the_flags_variables() {
        let text = "broker = \"amqp://x\"\npull-stall-secs = 30\nallow-setid = true\nignore = [\"*.o\", \"build/\"]\ndb = \"/var/m.db\"\n";
        let mut got = settings(&cmd(), text, Path::new("f.toml")).unwrap();
        got.sort();
        let want = [("T_BROKER", "amqp://x"), ("T_DB", "/var/m.db"), ("T_IGNORE", "*.o\nbuild/"), ("T_SETID", "true"), ("T_STALL", "30")];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn typos_and_wrong_shapes_are_errors() {
        let e = settings(&cmd(), "brokr = \"x\"", Path::new("f.toml")).unwrap_err().to_string();
        assert!(e.contains("unknown setting `brokr`") && e.contains("broker"), "{e}");
        assert!(settings(&cmd(), "broker = [\"a\", \"b\"]", Path::new("f.toml")).is_err());
        assert!(settings(&cmd(), "broker = { a = 1 }", Path::new("f.toml")).is_err());
        assert!(settings(&cmd(), "broker = ", Path::new("f.toml")).is_err());
    }

    #[test]
    fn the_file_comes_from_the_flag_then_the_variable_then_the_default() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("node.toml");
        assert_eq!(chosen_file(&args(&["x"]), "T_CONFIG_UNSET", &default), None);
        std::fs::write(&default, "").unwrap();
        assert_eq!(chosen_file(&args(&["x"]), "T_CONFIG_UNSET", &default), Some(default.clone()));
        assert_eq!(chosen_file(&args(&["x", "--config", "a.toml"]), "T_CONFIG_UNSET", &default), Some("a.toml".into()));
        assert_eq!(chosen_file(&args(&["x", "--config=b.toml"]), "T_CONFIG_UNSET", &default), Some("b.toml".into()));
        assert_eq!(chosen_file(&args(&["x", "--", "--config", "a"]), "T_CONFIG_UNSET", &default), Some(default));
    }
}
