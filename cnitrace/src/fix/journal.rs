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

use crate::plan::Action;

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
        // One process may journal several fixes a second (an agent serving many CLIs): `-N` after the
        // first.
        let base = format!("{now}-{}", std::process::id());
        let id = (0..)
            .map(|k| if k == 0 { base.clone() } else { format!("{base}-{k}") })
            .find(|id| !jdir.join(format!("{id}.json")).exists())
            .unwrap_or(base);
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

    /// The fix `id`, or the newest one. An unreadable journal file stops only what it may be: the fix
    /// asked for by its id, or — without an id — the newest fix when the file is newer than every
    /// readable one (rolling back an older fix in its place would undo the wrong change).
    pub fn load(dir: &Path, id: Option<&str>) -> Result<Journal> {
        let Listing { journals, unreadable } = list(dir)?;
        let bad = |u: &Unreadable| anyhow!("the journal of fix {} cannot be read ({}): {}; nothing was changed", u.id, u.path.display(), u.error);
        match id {
            Some(id) => match journals.into_iter().find(|j| j.id == id) {
                Some(j) => Ok(j),
                None => Err(unreadable.iter().find(|u| u.id == id).map(bad).unwrap_or_else(|| anyhow!("no fix {id} in the journal"))),
            },
            None => {
                let newest = journals.into_iter().last();
                let newer_bad = unreadable.iter().filter(|u| newest.as_ref().is_none_or(|j| id_order(&u.id) > id_order(&j.id))).max_by_key(|u| id_order(&u.id));
                match (newest, newer_bad) {
                    (_, Some(u)) => Err(bad(u).context("the newest fix cannot be rolled back; name another with --rollback ID")),
                    (Some(j), None) => Ok(j),
                    (None, None) => Err(anyhow!("the journal holds no fix yet")),
                }
            }
        }
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
            writeln!(out, "{}", undo.command_lines("  undo: ", "        "))?;
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

/// A journal file that could not be read or parsed: named, never deleted.
#[derive(Debug)]
pub struct Unreadable {
    /// The fix id its file name gives.
    pub id: String,
    pub path: PathBuf,
    pub error: String,
}

/// Every journal, oldest first, and the files that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    pub journals: Vec<Journal>,
    pub unreadable: Vec<Unreadable>,
}

/// A fix id (`<epoch seconds>-<pid>[-<n>]`) as something that sorts by time.
fn id_order(id: &str) -> (u64, u64, u64) {
    let mut parts = id.split('-').map(|x| x.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Every journal of `dir`, oldest first; a file that cannot be read is listed as such and the rest
/// still are (one damaged file must not hide every other fix, nor block their rollback).
pub fn list(dir: &Path) -> Result<Listing> {
    let jdir = dir.join("journal");
    let mut out = Listing::default();
    let rd = match std::fs::read_dir(&jdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("read {}", jdir.display())),
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let read = std::fs::read(&p).map_err(|e| e.to_string()).and_then(|data| serde_json::from_slice::<Journal>(&data).map_err(|e| e.to_string()));
        match read {
            Ok(mut j) => {
                j.path = p;
                out.journals.push(j);
            }
            Err(error) => {
                let id = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                out.unreadable.push(Unreadable { id, path: p, error });
            }
        }
    }
    out.journals.sort_by_key(|j| (j.started, id_order(&j.id)));
    out.unreadable.sort_by_key(|u| id_order(&u.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cnitrace-journal-test-{}-{}", std::process::id(), files.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("journal")).expect("a temp folder");
        for (name, text) in files {
            std::fs::write(dir.join("journal").join(name), text).expect("write a journal file");
        }
        dir
    }

    fn journal(id: &str, started: u64) -> String {
        let j = Journal {
            id: id.into(),
            started,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            steps: Vec::new(),
            outcome: Outcome::Fixed,
            note: String::new(),
            path: PathBuf::new(),
        };
        serde_json::to_string(&j).expect("serialize")
    }

    #[test]
    fn one_unreadable_journal_hides_no_other_fix() {
        let dir = dir_with(&[("100-1.json", &journal("100-1", 100)), ("200-2.json", "{ not json"), ("300-3.json", &journal("300-3", 300))]);
        let l = list(&dir).expect("list");
        assert_eq!(l.journals.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["100-1", "300-3"]);
        assert_eq!(l.unreadable.len(), 1);
        assert_eq!(l.unreadable[0].id, "200-2");
        // The others load, by id and as the newest; the bad one is named, not guessed around.
        assert_eq!(Journal::load(&dir, Some("100-1")).expect("by id").id, "100-1");
        assert_eq!(Journal::load(&dir, None).expect("newest").id, "300-3");
        let e = format!("{:#}", Journal::load(&dir, Some("200-2")).unwrap_err());
        assert!(e.contains("200-2.json") && e.contains("cannot be read"), "{e}");
        assert!(dir.join("journal/200-2.json").exists(), "nothing is deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fixes_journaled_in_one_second_by_one_process_each_get_their_own_id_in_order() {
        let dir = dir_with(&[]).with_extension("same-second");
        let _ = std::fs::remove_dir_all(&dir);
        let ids: Vec<String> = (0..12).map(|_| Journal::create(&dir, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)).expect("create").id).collect();
        let listed: Vec<String> = list(&dir).expect("list").journals.into_iter().map(|j| j.id).collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), 12, "{ids:?}");
        // Within a second, in the order they were made (the 10th after the 9th, not after the 1st).
        let same: Vec<&String> = listed.iter().filter(|i| i.split('-').next() == ids[11].split('-').next()).collect();
        assert!(same.windows(2).all(|w| id_order(w[0]) < id_order(w[1])), "{listed:?}");
        assert_eq!(listed.last(), ids.last());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_newest_journal_is_not_replaced_by_an_older_fix() {
        let dir = dir_with(&[("100-1.json", &journal("100-1", 100)), ("900-9.json", "")]);
        let e = format!("{:#}", Journal::load(&dir, None).unwrap_err());
        assert!(e.contains("the newest fix cannot be rolled back") && e.contains("900-9.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
