//! The overload verdict a node publishes about itself, with hysteresis.
//!
//! A node is overloaded once a load sample goes above a threshold (`threshold_cpu`,
//! `threshold_memory`) and stays so until both are at or below the threshold less a margin
//! (`threshold_margin`). A node whose load hovers at a threshold (say 74, 76, 75, 77 % against
//! 75 %) then flips once, not at every sample: each flip republishes its record, and while it
//! flaps peers claim and hand back its tasks in turn.
//!
//! The node decides, from its own samples, and carries the verdict in its record
//! (`NodeRecord::overloaded`): replicas that saw different samples of its load still agree.

use omesh_protocol::LoadSample;

/// The thresholds of one node and how far below them its load must fall to count as
/// no longer overloaded. All in thousandths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadGate {
    /// CPU utilisation above which the node is overloaded.
    pub cpu_enter_permille: u16,
    /// Memory utilisation above which the node is overloaded.
    pub mem_enter_permille: u16,
    /// How far below both thresholds the load must fall to leave the overloaded state.
    pub margin_permille: u16,
}

impl OverloadGate {
    /// The verdict after `sample`, given the verdict before it (`was`).
    pub fn next(&self, was: bool, sample: LoadSample) -> bool {
        let above = sample.cpu_permille > self.cpu_enter_permille
            || sample.mem_permille > self.mem_enter_permille;
        if !was {
            return above;
        }
        let leave = |enter: u16| enter.saturating_sub(self.margin_permille);
        let clear = sample.cpu_permille <= leave(self.cpu_enter_permille)
            && sample.mem_permille <= leave(self.mem_enter_permille);
        !clear
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATE: OverloadGate = OverloadGate {
        cpu_enter_permille: 750,
        mem_enter_permille: 800,
        margin_permille: 100,
    };

    fn cpu(cpu_permille: u16) -> LoadSample {
        LoadSample {
            cpu_permille,
            mem_permille: 100,
        }
    }

    /// Runs `series` through the gate from "not overloaded"; returns the verdicts.
    fn run(series: &[u16]) -> Vec<bool> {
        let mut state = false;
        series
            .iter()
            .map(|&c| {
                state = GATE.next(state, cpu(c));
                state
            })
            .collect()
    }

    #[test]
    fn a_load_hovering_at_the_threshold_flips_once() {
        // Around 75 % with ±3 points of noise, as a saturated node's EWMA reads.
        let series = [
            700, 740, 760, 745, 752, 748, 770, 731, 755, 749, 762, 738, 751, 746, 758, 742,
        ];
        let verdicts = run(&series);
        let flips = verdicts.windows(2).filter(|w| w[0] != w[1]).count()
            + usize::from(verdicts.first() == Some(&true));
        assert_eq!(flips, 1, "verdicts {verdicts:?}");
        assert_eq!(verdicts.iter().position(|&v| v), Some(2));
        // Without hysteresis the same series crosses the threshold at most samples.
        let naive = series.iter().map(|&c| c > 750).collect::<Vec<_>>();
        assert!(naive.windows(2).filter(|w| w[0] != w[1]).count() > 5);
    }

    #[test]
    fn leaves_only_below_the_threshold_less_the_margin() {
        assert_eq!(
            run(&[800, 700, 651, 650, 700, 751]),
            [true, true, true, false, false, true]
        );
    }

    #[test]
    fn memory_alone_enters_and_both_must_clear_to_leave() {
        let mem = |mem_permille| LoadSample {
            cpu_permille: 100,
            mem_permille,
        };
        assert!(GATE.next(false, mem(801)));
        assert!(!GATE.next(false, mem(800)));
        assert!(GATE.next(true, mem(701)));
        assert!(!GATE.next(true, mem(700)));
        // CPU clear, memory not: still overloaded.
        assert!(GATE.next(
            true,
            LoadSample {
                cpu_permille: 0,
                mem_permille: 750
            }
        ));
    }

    #[test]
    fn a_margin_wider_than_the_threshold_leaves_at_zero() {
        let gate = OverloadGate {
            margin_permille: 900,
            ..GATE
        };
        assert!(gate.next(true, cpu(1)));
        assert!(gate.next(true, cpu(0)), "memory at 10 % is above 0");
        assert!(!gate.next(true, LoadSample::default()));
    }
}
