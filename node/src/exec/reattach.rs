//! Instances that outlive their peer, seen from the executor: a restarted peer re-attaches
//! to the guards its earlier incarnation left ([`Executor::reattach`]), follows each instance
//! again under the epoch its guard names, re-keys it when the replica adopts it
//! ([`Executor::adopt`]), and a peer that leaves lets go of them ([`Executor::detach_survivors`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use omesh_protocol::{Epoch, NodeId, TaskId};
use tokio::sync::{mpsc, watch};

use super::{cancelled, Backend, Ended, Event, Executor, Report, Running};

/// An instance an earlier incarnation of this peer left running, re-attached through its
/// guard: what [`Backend::resume`] follows to its end.
#[derive(Debug)]
pub struct Adopted {
    /// The task.
    pub task: TaskId,
    /// The epoch it runs under (the replica may re-key it later).
    pub epoch: Epoch,
    /// What its guard said it watches.
    pub info: crate::guard::Attached,
    /// Its guard.
    pub guard: crate::guard::Guard,
    /// Its log (the current epoch's file).
    pub log_path: PathBuf,
    /// The file remembering its process group (`<task>-<started epoch>.pgid`), removed when
    /// it ends.
    pub group_file: PathBuf,
}

impl Adopted {
    /// What is left of the task's run-time limit (`None`: it has none).
    pub fn timeout_left(&self) -> Option<Duration> {
        (self.info.timeout_ms > 0).then(|| {
            Duration::from_millis(self.info.timeout_ms.saturating_sub(self.info.running_ms))
        })
    }
}

/// What a restarted peer found of its earlier incarnation's surviving instances, and what the
/// start-up clean-up must therefore spare.
#[derive(Debug, Default, Clone)]
pub struct Reattached {
    /// The instances re-attached: `(task, epoch)` for `Input::Adopt`.
    pub adopted: Vec<(TaskId, Epoch)>,
    /// What the clean-up of leftovers must not end.
    pub keep: Keep,
}

/// Leftovers of an earlier incarnation that are not leftovers: the guards, process groups,
/// cgroups and containers of re-attached instances.
#[derive(Debug, Default, Clone)]
pub struct Keep {
    /// Guard pids.
    pub guards: Vec<u32>,
    /// Process groups (the main pid of a process task).
    pub groups: Vec<i32>,
    /// Cgroup directory names under the node's parent.
    pub cgroups: Vec<String>,
    /// Container names.
    pub containers: Vec<String>,
}

impl Executor {
    /// The replica adopted the re-attached instance of `(task, from)` under `epoch`: its
    /// reports, renewals and log follow the new epoch from now on. `false` if no re-attached
    /// instance of `(task, from)` waits for adoption (it ended, or was never found).
    pub fn adopt(&mut self, task: TaskId, from: Epoch, epoch: Epoch) -> bool {
        if self
            .running
            .get(&(task, from))
            .is_none_or(|r| r.adopting.is_none())
        {
            return false;
        }
        let Some(mut r) = self.running.remove(&(task, from)) else {
            return false;
        };
        // The log follows (an open descriptor keeps writing to the renamed file).
        let (old, new) = (self.log_path(&task, from), self.log_path(&task, epoch));
        if let Err(e) = std::fs::rename(&old, &new) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(task = %task.short(), from, epoch, error = %e, "cannot move the adopted instance's log");
            }
        }
        r.adopting = None;
        r.epoch.send_replace(epoch);
        self.running.insert((task, epoch), r);
        true
    }

    /// Lets go of the instances that outlive this peer (graceful shutdown, before the leave):
    /// they are neither renewed nor stopped any more, and their guards keep them until the
    /// deadline last set, waiting for this peer's next incarnation. Returns how many.
    pub fn detach_survivors(&mut self) -> usize {
        let before = self.running.len();
        // Dropping the senders ends renewals; the runs see no stop, and end (dropping their
        // guards' links) when the process does.
        self.running.retain(|_, r| !r.survives);
        before - self.running.len()
    }

    /// Re-attaches to the guards an earlier incarnation of `node` left running (instances
    /// that outlive their peer): each answering guard's instance is followed again as
    /// running under the epoch the guard names, never renewed past the deadline its guard
    /// was given until [`Self::adopt`], and held to its report until adopted or stopped.
    /// Stale sockets are removed; a guard that does not answer, or whose backend this peer
    /// lacks, is left to [`Self::cleanup_orphans`] like any leftover.
    pub async fn reattach(&mut self, node: &NodeId) -> Reattached {
        let mut found = Reattached::default();
        let Some(dir) = self.guard_dir.clone() else {
            return found;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return found;
        };
        let ours: Vec<u32> = crate::guard::cleanup::guards_of(node)
            .into_iter()
            .map(|p| p.as_raw_nonzero().get().unsigned_abs())
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("sock") {
                continue;
            }
            let attaching = match crate::guard::Guard::attach(&path).await {
                Ok(a) => a,
                Err(crate::guard::AttachError::Stale(p)) => {
                    let _ = std::fs::remove_file(p);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-attach to a guard of an earlier run");
                    continue;
                }
            };
            if !attaching.pid().is_some_and(|p| ours.contains(&p)) {
                tracing::warn!(socket = %path.display(), "a process that is not a guard of this node listens in its guard directory");
                continue;
            }
            let info = attaching.info.clone();
            let backend = match info.target {
                crate::guard::AttachedTarget::Process { .. } => Some(Arc::clone(&self.process)),
                crate::guard::AttachedTarget::Container { .. } => self.docker.clone(),
            };
            let Some(backend) = backend else {
                tracing::warn!(task = %info.task.short(), epoch = info.epoch, "an instance of an earlier run is a container, and this peer has no Docker engine: it is ended");
                continue;
            };
            let (task, epoch) = (info.task, info.epoch);
            if self.running.contains_key(&(task, epoch)) {
                continue;
            }
            let now = tokio::time::Instant::now();
            let mut running = Running::new(epoch, now, true);
            running.adopting = Some(now + Duration::from_millis(info.deadline_ms));
            let guard = attaching.follow(running.lease.subscribe(), running.epoch.subscribe());
            found.keep.guards.extend(guard.pid());
            match &info.target {
                crate::guard::AttachedTarget::Process { pid, cgroup, .. } => {
                    found
                        .keep
                        .groups
                        .extend(pid.and_then(|p| i32::try_from(p).ok()));
                    found.keep.cgroups.extend(cgroup.clone());
                }
                crate::guard::AttachedTarget::Container { name } => {
                    found.keep.containers.push(name.clone());
                }
            }
            let adopted = Adopted {
                task,
                epoch,
                guard,
                log_path: self.log_path(&task, epoch),
                group_file: self
                    .log_path(&task, info.started_epoch)
                    .with_extension("pgid"),
                info,
            };
            tracing::info!(task = %task.short(), epoch, "re-attached to an instance of an earlier run");
            let cancel = running.cancel.subscribe();
            let epochs = running.epoch.subscribe();
            self.running.insert((task, epoch), running);
            tokio::spawn(follow_adopted(
                backend,
                adopted,
                cancel,
                epochs,
                self.reports.clone(),
            ));
            found.adopted.push((task, epoch));
        }
        found
    }
}

/// Follows a re-attached instance to its end. Its report waits until the replica decides:
/// adopted (the epoch moves, and the end is reported under the new one; the replica marks the
/// new epoch running itself, so no `Started` is sent) or stopped (the end is `Stopped` under
/// the old epoch, whatever it was).
async fn follow_adopted(
    backend: Arc<dyn Backend>,
    adopted: Adopted,
    mut cancel: watch::Receiver<bool>,
    mut epochs: watch::Receiver<Epoch>,
    reports: mpsc::Sender<Report>,
) {
    let task = adopted.task;
    let resume = backend.resume(adopted, cancel.clone());
    tokio::pin!(resume);
    let mut end = None;
    let adopted = loop {
        tokio::select! {
            // Moved (adopted), or let go of (this peer shuts down: nobody reads reports).
            changed = epochs.changed() => break changed.is_ok(),
            () = cancelled(&mut cancel) => break false,
            e = &mut resume, if end.is_none() => end = Some(e),
        }
    };
    let stopped_first = !adopted && *cancel.borrow();
    let end = match end {
        Some(e) => e,
        None => resume.await,
    };
    let event = if stopped_first {
        Event::Ended(Ended::Stopped)
    } else {
        end.into()
    };
    let epoch = *epochs.borrow();
    let _ = reports.send(Report { task, epoch, event }).await;
}
