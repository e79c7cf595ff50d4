//! Markers: lines that task instances append, every ~100 ms, to one file per task in the
//! directory every peer's container mounts from the host (`/markers`). Each line is stamped
//! by busybox `ts` with the host kernel's realtime clock, which every container shares, so
//! markers written on different peers compare directly. A line reads
//! `<seconds>.<microseconds> <task> <epoch> <node>`; from them, the test works out when each
//! instance ran.

use std::collections::BTreeMap;
use std::path::Path;

/// How often an instance writes a marker (plus a fork of `ts`).
pub(crate) const PERIOD_MS: u64 = 100;

/// The loop of an instance that writes markers until `/markers/<task>.end` exists; `&` and
/// `wait` run it beside the task's shell, so an instance is two long-lived processes.
pub(crate) const SCRIPT: &str = r#"node=$(hostname)
while [ ! -e /markers/$OMESH_TASK_ID.end ]; do
    echo "$OMESH_TASK_ID $OMESH_EPOCH $node" | ts %.s >> /markers/$OMESH_TASK_ID
    sleep 0.1
done &
wait"#;

/// What the markers show of one instance: its (epoch, node), and its first and last marker
/// (microseconds of the host's clock). It ran at least over `[first_us, last_us]`, and at
/// most one marker period longer at either end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) epoch: u64,
    pub(crate) node: String,
    pub(crate) first_us: u64,
    pub(crate) last_us: u64,
    pub(crate) markers: usize,
    /// The longest time between two of its consecutive markers.
    pub(crate) max_gap_us: u64,
}

/// One marker: when (microseconds of the host's realtime clock), and which instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) at_us: u64,
    pub(crate) epoch: u64,
    pub(crate) node: String,
}

/// The markers `task`'s instances wrote under `dir`, in file order (none yet: empty).
pub(crate) fn read(dir: &Path, task: &str) -> Vec<Marker> {
    match std::fs::read_to_string(dir.join(task)) {
        Ok(text) => parse(&text, task),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("markers of {task}: {e}"),
    }
}

/// The runs of `task`'s instances from their markers under `dir`.
pub(crate) fn read_runs(dir: &Path, task: &str) -> Vec<Run> {
    runs(&read(dir, task))
}

/// Asks every instance of `task` to end (the marker loop exits, the task succeeds).
pub(crate) fn end(dir: &Path, task: &str) {
    std::fs::write(dir.join(format!("{task}.end")), b"").unwrap();
}

/// Now on the host's realtime clock, in microseconds (the markers' clock).
pub(crate) fn now_us() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_micros()).unwrap()
}

/// The markers of `task` in a marker file's `text`. A line cut short (an instance killed
/// while it wrote) is skipped.
pub(crate) fn parse(text: &str, task: &str) -> Vec<Marker> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(stamp), Some(t), Some(epoch), Some(node), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            continue;
        };
        let (Some(at_us), Ok(epoch)) = (micros(stamp), epoch.parse()) else {
            continue;
        };
        if t == task {
            out.push(Marker {
                at_us,
                epoch,
                node: node.to_owned(),
            });
        }
    }
    out
}

/// The runs the `markers` show, one per instance (epoch, node), by their first marker.
pub(crate) fn runs(markers: &[Marker]) -> Vec<Run> {
    let mut by_instance: BTreeMap<(u64, &str), Vec<u64>> = BTreeMap::new();
    for m in markers {
        by_instance
            .entry((m.epoch, m.node.as_str()))
            .or_default()
            .push(m.at_us);
    }
    let mut runs: Vec<Run> = by_instance
        .into_iter()
        .map(|((epoch, node), mut stamps)| {
            stamps.sort_unstable();
            Run {
                epoch,
                node: node.to_owned(),
                first_us: stamps[0],
                last_us: stamps[stamps.len() - 1],
                markers: stamps.len(),
                max_gap_us: stamps.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
            }
        })
        .collect();
    runs.sort_by_key(|r| (r.first_us, r.last_us));
    runs
}

/// `<seconds>.<microseconds>` as microseconds.
fn micros(stamp: &str) -> Option<u64> {
    let (s, frac) = stamp.split_once('.')?;
    if frac.len() != 6 {
        return None;
    }
    Some(s.parse::<u64>().ok()? * 1_000_000 + frac.parse::<u64>().ok()?)
}

/// Every pair of runs (by index in `runs`, sorted by first marker) whose `[first, last]`
/// intervals meet or overlap: two instances of the task ran at one instant.
pub(crate) fn overlaps(runs: &[Run]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for (j, b) in runs.iter().enumerate().skip(i + 1) {
            if b.first_us <= a.last_us && a.first_us <= b.last_us {
                out.push((i, j));
            }
        }
    }
    out
}

#[test]
fn runs_and_overlaps_are_read_from_marker_lines() {
    let text = "\
        100.000000 t 1 p1\n\
        100.100000 t 1 p1\n\
        100.250000 u 1 p2\n\
        100.300000 t 1 p1\n\
        105.000000 t 2 p3\n\
        105.1000\n\
        105.100000 t 2 p3\n";
    let r = runs(&parse(text, "t"));
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].epoch, r[0].node.as_str(), r[0].first_us, r[0].last_us),
        (1, "p1", 100_000_000, 100_300_000)
    );
    assert_eq!((r[0].markers, r[0].max_gap_us), (3, 200_000));
    assert_eq!(
        (r[1].epoch, r[1].first_us, r[1].markers),
        (2, 105_000_000, 2)
    );
    assert!(overlaps(&r).is_empty());
    // A stale instance that wrote once more after its successor started.
    let late = format!("{text}105.050000 t 1 p1\n");
    let r = runs(&parse(&late, "t"));
    assert_eq!(overlaps(&r), vec![(0, 1)]);
}
