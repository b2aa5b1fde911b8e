//! A real `hyperbox-operator` with its state dir and log, and signed webhook bodies.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use sha2::Sha256;

use crate::*;

/// A running `hyperbox-operator git` against a node.
pub struct Operator {
    child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// A command the operator runs under (for example `faketime -f +300s`); none by default.
    pub wrapper: Vec<String>,
}

impl Operator {
    /// Whether the process has ended (it is reaped then).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn start(node: &Node, repo_url: &str, extra: &[&str]) -> Result<Operator> {
        let state = node
            .dir
            .path()
            .join(format!("operator-{}", random_suffix()));
        fs::create_dir_all(&state)?;
        let mut args = vec![
            "git".to_string(),
            "--repo".into(),
            repo_url.into(),
            "--node".into(),
            format!("unix://{}", node.socket.display()),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut op = Operator {
            child: None,
            log: state.join("operator.log"),
            state,
            args,
            wrapper: Vec::new(),
        };
        op.spawn()?;
        Ok(op)
    }

    /// `hyperbox-operator` with exactly `args` (for example `git --config FILE --state-dir
    /// DIR`), logging to `state/operator.log`; `state` must be the state dir the args name.
    pub fn start_with_args(state: PathBuf, args: &[&str]) -> Result<Operator> {
        Operator::start_wrapped(state, &[], args)
    }

    /// Like [`Operator::start_with_args`], run under `wrapper` (a command and its arguments
    /// that take the operator's command line after them, such as `faketime -f +300s`).
    pub fn start_wrapped(state: PathBuf, wrapper: &[&str], args: &[&str]) -> Result<Operator> {
        fs::create_dir_all(&state)?;
        let mut op = Operator {
            child: None,
            log: state.join("operator.log"),
            state,
            args: args.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        op.spawn()?;
        Ok(op)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("hyperbox-operator"));
                c
            }
            None => Command::new(bin("hyperbox-operator")),
        };
        self.child = Some(
            cmd.args(&self.args)
                .env("RUST_LOG", "info,hyperbox_operator=debug")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start hyperbox-operator")?,
        );
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn status(&self) -> Option<Value> {
        operator_fixtures::operator_status(&self.state)
    }

    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        operator_fixtures::wait_operator_status(&self.state, &self.log, timeout, what, pred)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// HMAC-SHA256 signature header value (`sha256=<hex>`) of a webhook body.
pub fn webhook_signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
