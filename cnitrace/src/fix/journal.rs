//! The journal of a fix: written and synced before each action, holding each action's undo computed
//! from the state before it, so `--rollback` works after a crash or `kill -9` at any point.

use std::{
    fs::File,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::action::Action;

/// Where journals live unless `--journal-dir` / `CNITRACE_STATE_DIR` say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cnitrace";

pub fn state_dir(over: Option<&Path>) -> PathBuf {
    over.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CNITRACE_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Planned,
    /// Marked before the action runs: after a crash it may or may not have happened; undo covers both.
    Applying,
    Applied,
    Undone,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalStep {
    pub cause: String,
    pub why: String,
    pub action: Action,
    pub undo: Action,
    pub state: StepState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    InProgress,
    Fixed,
    RolledBack,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    pub id: String,
    /// Seconds since the epoch.
    pub started: u64,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub steps: Vec<JournalStep>,
    pub outcome: Outcome,
    pub note: String,
    #[serde(skip)]
    path: PathBuf,
}

impl Journal {
    pub fn create(dir: &Path, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Journal> {
        let jdir = dir.join("journal");
        std::fs::create_dir_all(&jdir).with_context(|| format!("create {}", jdir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let id = format!("{now}-{}", std::process::id());
        let j = Journal {
            path: jdir.join(format!("{id}.json")),
            id,
            started: now,
            src,
            dst,
            steps: Vec::new(),
            outcome: Outcome::InProgress,
            note: String::new(),
        };
        j.sync()?;
        Ok(j)
    }

    /// Writes the journal durably: temp file, fsync, rename, fsync of the folder.
    pub fn sync(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(parent) = self.path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    pub fn load(dir: &Path, id: Option<&str>) -> Result<Journal> {
        let all = list(dir)?;
        let j = match id {
            Some(id) => all.into_iter().find(|j| j.id == id).ok_or_else(|| anyhow!("no fix {id} in the journal"))?,
            None => all.into_iter().last().ok_or_else(|| anyhow!("the journal holds no fix yet"))?,
        };
        Ok(j)
    }

    /// Undoes every step that was (or may have been) applied, newest first. Keeps going past errors and
    /// reports them: a half-finished rollback is worse than one that says what it could not restore.
    pub fn rollback(&mut self, out: &mut dyn Write) -> Result<()> {
        let mut errors = Vec::new();
        for i in (0..self.steps.len()).rev() {
            if !matches!(self.steps[i].state, StepState::Applying | StepState::Applied) {
                continue;
            }
            let undo = self.steps[i].undo.clone();
            writeln!(out, "  undo: {}", undo.command())?;
            match undo.apply() {
                Ok(()) => {}
                // Marked applying but never applied (a crash between the mark and the change).
                Err(e) if self.steps[i].state == StepState::Applying => writeln!(out, "    (it had not been applied: {e:#})")?,
                Err(e) => errors.push(format!("{e:#}")),
            }
            self.steps[i].state = StepState::Undone;
            self.sync()?;
        }
        self.outcome = Outcome::RolledBack;
        self.sync()?;
        if !errors.is_empty() {
            bail!("rollback could not restore everything: {}", errors.join("; "));
        }
        Ok(())
    }
}

/// Every journal, oldest first.
pub fn list(dir: &Path) -> Result<Vec<Journal>> {
    let jdir = dir.join("journal");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&jdir) else { return Ok(out) };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let data = std::fs::read(&p)?;
            let mut j: Journal = serde_json::from_slice(&data).with_context(|| format!("read {}", p.display()))?;
            j.path = p;
            out.push(j);
        }
    }
    out.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    Ok(out)
}
