//! Will a pre-copy transfer finish, and when? A model fed the progress
//! samples the hypervisor reports, in the sans-IO style of the rest of the
//! protocol: no clock reads, no IO. It judges by rates, not by the
//! remaining bytes alone: at the start of every pre-copy pass the pages the
//! guest dirtied during the last one are added back, so "remaining" goes
//! up before it goes down, and a naive progress bar runs backwards.
//!
//! The verdict, over the newest samples of a short window:
//! - `stalled`: nothing moved for [`STALL_MS`];
//! - `not converging`: the guest dirties memory at least as fast as the
//!   link carries it, so no pass leaves less to send than the one before;
//! - `slow`: it converges, but its net progress is a small part of the
//!   link (under [`SLOW_SHARE`]), so the end is far and fragile;
//! - `converging`: otherwise, with an ETA.
//!
//! Each verdict comes with its reason in an operator's words
//! ("dirtying 1.4 GiB/s, link 1.1 GiB/s").

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Millis, TransferStats};

/// Samples older than this (by the hypervisor's elapsed time) leave the window.
pub const WINDOW_MS: Millis = 10_000;
/// No byte sent for this long is a stall.
pub const STALL_MS: Millis = 3_000;
/// Net progress under this share of the link is slow.
pub const SLOW_SHARE: f64 = 0.1;
/// Net progress under this share of the link is none: QEMU measures the
/// dirty rate as the pages found dirty again at each sync, which cannot
/// exceed what the link sent between syncs, so a guest that dirties faster
/// than the link shows a dirty rate just under the link's rate.
pub const STUCK_SHARE: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Converging,
    Slow,
    NotConverging,
    Stalled,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Converging => "converging",
            Verdict::Slow => "slow",
            Verdict::NotConverging => "not converging",
            Verdict::Stalled => "stalled",
        }
    }
}

/// The model's answer: the verdict, when the transfer should end (for a
/// transfer that converges), and why, in an operator's words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outlook {
    pub verdict: Verdict,
    /// From the newest sample to the switchover, if it converges.
    pub eta_ms: Option<Millis>,
    pub reason: String,
}

/// The newest samples of one transfer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Convergence {
    samples: VecDeque<TransferStats>,
}

impl Convergence {
    /// Take in a progress sample. Samples come in the order of their
    /// `elapsed_ms`; one from before the newest is ignored.
    pub fn observe(&mut self, stats: TransferStats) {
        if self
            .samples
            .back()
            .is_some_and(|last| stats.elapsed_ms < last.elapsed_ms)
        {
            return;
        }
        self.samples.push_back(stats);
        let newest = stats.elapsed_ms;
        // Keep one sample at or before the window's start, so the window
        // spans it whole.
        while self.samples.len() > 2 && newest - self.samples[1].elapsed_ms >= WINDOW_MS {
            self.samples.pop_front();
        }
    }

    /// After the first pass, each new pass starts with what the last one
    /// left: when two passes in a row start with about as much (within
    /// [`STUCK_SHARE`]), pre-copy has stopped gaining. QEMU learns the
    /// guest's dirty rate late (its first pass, the whole memory, reports
    /// a fraction of it), but the remaining bytes at each pass's start say
    /// it from the second pass on.
    fn passes_stopped_shrinking(&self) -> Option<(u64, u64)> {
        let starts: Vec<u64> = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .filter(|(a, b)| b.iteration > a.iteration && b.iteration >= 3)
            .map(|(_, b)| b.bytes_remaining)
            .collect();
        starts
            .windows(2)
            .find(|w| w[0] > 0 && w[1] as f64 >= w[0] as f64 * (1.0 - STUCK_SHARE))
            .map(|w| (w[0], w[1]))
    }

    /// The outlook, given the pause the final pass may cause; `None` before
    /// there are two samples to compare.
    pub fn outlook(&self, downtime_limit_ms: Millis) -> Option<Outlook> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span_ms = last.elapsed_ms.saturating_sub(first.elapsed_ms);
        if self.samples.len() < 2 || span_ms == 0 {
            return None;
        }
        let sent = last
            .bytes_transferred
            .saturating_sub(first.bytes_transferred);
        // Since the last byte moved: from the first sample that had sent
        // as much as the newest.
        let still_ms = self
            .samples
            .iter()
            .find(|s| s.bytes_transferred >= last.bytes_transferred)
            .map(|s| last.elapsed_ms - s.elapsed_ms)
            .unwrap_or(0);
        if still_ms >= STALL_MS {
            return Some(Outlook {
                verdict: Verdict::Stalled,
                eta_ms: None,
                reason: format!(
                    "nothing sent for {} s ({} left)",
                    still_ms / 1000,
                    bytes(last.bytes_remaining)
                ),
            });
        }
        if sent == 0 {
            return None;
        }
        // The link's rate as measured over the window; the guest's dirty
        // rate as the hypervisor last measured it (it knows only after a
        // pass, so 0 on the first).
        let link = sent as f64 * 1000.0 / span_ms as f64;
        let dirty = self
            .samples
            .iter()
            .map(|s| s.dirty_rate_bytes_s)
            .max()
            .unwrap_or(0) as f64;
        let rates = format!(
            "dirtying {}/s, link {}/s",
            bytes(dirty as u64),
            bytes(link as u64)
        );
        let net = link - dirty;
        if net <= STUCK_SHARE * link {
            return Some(Outlook {
                verdict: Verdict::NotConverging,
                eta_ms: None,
                reason: format!("{rates}: each pass leaves as much to send as the last"),
            });
        }
        if let Some((before, after)) = self.passes_stopped_shrinking() {
            return Some(Outlook {
                verdict: Verdict::NotConverging,
                eta_ms: None,
                reason: format!(
                    "passes start with as much left as the one before ({} then {}; link {}/s)",
                    bytes(before),
                    bytes(after),
                    bytes(link as u64)
                ),
            });
        }
        // The final pass starts once what is left fits in the pause.
        let final_pass = link * downtime_limit_ms as f64 / 1000.0;
        let to_go = (last.bytes_remaining as f64 - final_pass).max(0.0);
        let eta_ms = (to_go / net * 1000.0) as Millis;
        let verdict = if net < SLOW_SHARE * link {
            Verdict::Slow
        } else {
            Verdict::Converging
        };
        Some(Outlook {
            verdict,
            eta_ms: Some(eta_ms),
            reason: format!(
                "{rates}: {} left, net {}/s",
                bytes(last.bytes_remaining),
                bytes(net as u64)
            ),
        })
    }
}

/// At most this many points of remaining bytes over time in a record.
pub const HISTORY_POINTS: usize = 64;

/// What a record shows of a transfer's convergence: the newest outlook and
/// the remaining bytes over time (by the hypervisor's elapsed time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvergenceView {
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<Millis>,
    pub reason: String,
    /// `[elapsed_ms, remaining bytes]`, oldest first, about evenly spaced.
    #[serde(default)]
    pub remaining: Vec<[u64; 2]>,
}

/// Add a sample to a remaining-bytes history, keeping at most
/// [`HISTORY_POINTS`] about evenly spaced: a point closer to the last than
/// the span divided by half the points is dropped (but always replaces the
/// newest, so the end is current), and a full history loses every other
/// point.
pub fn record_remaining(history: &mut Vec<[u64; 2]>, elapsed_ms: Millis, remaining: u64) {
    if let Some(last) = history.last()
        && elapsed_ms < last[0]
    {
        return;
    }
    if history.len() >= 2 {
        let span = history[history.len() - 1][0] - history[0][0];
        let gap = (span / (HISTORY_POINTS as u64 / 2)).max(1000);
        let before = history[history.len() - 2][0];
        if elapsed_ms - before < gap {
            // Too close to the point before the newest: the newest moves.
            let n = history.len();
            history[n - 1] = [elapsed_ms, remaining];
            return;
        }
    }
    if history.len() >= HISTORY_POINTS {
        let last = history[history.len() - 1];
        let kept: Vec<[u64; 2]> = history.iter().copied().step_by(2).collect();
        *history = kept;
        if history.last() != Some(&last) {
            history.push(last);
        }
    }
    history.push([elapsed_ms, remaining]);
}

/// Bytes as an operator reads them: `512 B`, `3.4 MiB`, `2.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_that_start_with_as_much_left_are_not_converging_before_the_dirty_rate_says_so() {
        fn pass(c: &mut Convergence, t: Millis, sent: u64, left: u64, dirty: u64, iteration: u32) {
            let mut x = at(t, sent, left, dirty);
            x.iteration = iteration;
            c.observe(x);
        }
        // Pass 1 (the whole memory) reports a dirty rate a fraction of the
        // guest's; passes 3 and 4 start with the same 16 MiB left.
        let mut c = Convergence::default();
        pass(&mut c, 0, 0, 128, 0, 1);
        pass(&mut c, 4000, 64, 64, 0, 1);
        pass(&mut c, 8000, 128, 16, 2, 2);
        pass(&mut c, 9000, 144, 16, 8, 3);
        assert_ne!(
            c.outlook(300).map(|o| o.verdict),
            Some(Verdict::NotConverging),
            "one pass start after the first says nothing yet"
        );
        pass(&mut c, 10000, 160, 16, 8, 4);
        let o = c.outlook(300).expect("an outlook");
        assert_eq!(o.verdict, Verdict::NotConverging, "{o:?}");
        assert_eq!(
            o.reason,
            "passes start with as much left as the one before (16.0 MiB then 16.0 MiB; link 16.0 MiB/s)"
        );
        // Passes that keep shrinking converge.
        let mut c = Convergence::default();
        pass(&mut c, 0, 0, 128, 0, 1);
        pass(&mut c, 8000, 128, 32, 2, 2);
        pass(&mut c, 9000, 160, 16, 2, 3);
        pass(&mut c, 9500, 176, 8, 2, 4);
        assert_ne!(
            c.outlook(300).map(|o| o.verdict),
            Some(Verdict::NotConverging)
        );
    }

    #[test]
    fn a_dirty_rate_just_under_the_link_is_not_converging() {
        // As QEMU measures it: pages found dirty again at each sync cannot
        // exceed what the link sent, so a guest dirtying faster than the
        // link shows a dirty rate a hair under the link's rate.
        let mut c = Convergence::default();
        for i in 0..5u64 {
            c.observe(at(i * 1000, 100 + 16 * i, 13, 16));
        }
        // 16 MiB/s sent, 16 MiB/s dirtied: none left over.
        let o = c.outlook(300).expect("an outlook");
        assert_eq!(o.verdict, Verdict::NotConverging, "{o:?}");
        let mut c = Convergence::default();
        for i in 0..5u64 {
            c.observe(at(i * 1000, 100 + 100 * i, 500, 97));
        }
        assert_eq!(
            c.outlook(300).expect("an outlook").verdict,
            Verdict::NotConverging,
            "97 % of the link dirtied again is no progress"
        );
    }

    #[test]
    fn the_history_stays_bounded_evenly_spaced_and_current() {
        let mut history = Vec::new();
        for t in 0..3_600u64 {
            // One sample every 100 ms for six minutes.
            record_remaining(&mut history, t * 100, 1_000_000 - t);
        }
        assert!(history.len() <= HISTORY_POINTS, "{}", history.len());
        assert!(history.len() >= HISTORY_POINTS / 4, "{}", history.len());
        assert_eq!(history[0], [0, 1_000_000], "the start stays");
        assert_eq!(
            *history.last().unwrap(),
            [359_900, 1_000_000 - 3_599],
            "the end is current"
        );
        let gaps: Vec<u64> = history.windows(2).map(|w| w[1][0] - w[0][0]).collect();
        let (min, max) = (
            gaps.iter().min().unwrap(),
            gaps[..gaps.len() - 1].iter().max().unwrap(),
        );
        assert!(
            max / min.max(&1) <= 8,
            "about even: gaps from {min} to {max} ms"
        );
        // Out of order: ignored.
        let before = history.clone();
        record_remaining(&mut history, 10, 5);
        assert_eq!(history, before);
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A sample at `t` ms: `sent` and `left` in MiB, dirty rate in MiB/s.
    fn at(t: Millis, sent: u64, left: u64, dirty: u64) -> TransferStats {
        TransferStats {
            bytes_total: 4 * GIB,
            bytes_transferred: sent * MIB,
            bytes_remaining: left * MIB,
            rate_bytes_s: 1,
            dirty_rate_bytes_s: dirty * MIB,
            elapsed_ms: t,
            ..Default::default()
        }
    }

    fn outlook(trace: &[TransferStats]) -> Outlook {
        let mut c = Convergence::default();
        for s in trace {
            c.observe(*s);
        }
        c.outlook(300).expect("enough samples")
    }

    #[test]
    fn one_sample_says_nothing_yet() {
        let mut c = Convergence::default();
        assert_eq!(c.outlook(300), None);
        c.observe(at(0, 0, 4096, 0));
        assert_eq!(c.outlook(300), None);
    }

    #[test]
    fn a_first_pass_at_full_speed_converges_with_an_eta() {
        // 1 GiB/s, nothing dirtied yet: 4 GiB, 1 sent after 1 s.
        let o = outlook(&[at(0, 0, 4096, 0), at(1000, 1024, 3072, 0)]);
        assert_eq!(o.verdict, Verdict::Converging);
        // 3 GiB left less the 300 ms final pass (0.3 GiB), at 1 GiB/s.
        assert_eq!(o.eta_ms, Some(2700));
        assert!(o.reason.contains("link 1.0 GiB/s"), "{}", o.reason);
    }

    #[test]
    fn remaining_that_goes_up_at_a_new_pass_is_not_taken_for_failure() {
        // Pass 1 ends with 100 MiB left; pass 2 starts with what the guest
        // dirtied meanwhile (remaining jumps to 600 MiB), then drains.
        let trace = [
            at(0, 0, 4096, 0),
            at(1000, 1024, 3072, 0),
            at(3900, 3996, 100, 0),
            at(4000, 4096, 600, 150),
            at(5000, 5120, 100, 150),
        ];
        let o = outlook(&trace);
        assert_eq!(o.verdict, Verdict::Converging, "{}", o.reason);
        assert!(o.eta_ms.is_some());
        assert!(o.reason.contains("dirtying 150.0 MiB/s"), "{}", o.reason);
    }

    #[test]
    fn a_guest_that_dirties_faster_than_the_link_never_converges() {
        let trace = [
            at(0, 0, 4096, 0),
            at(4000, 4400, 800, 1400),
            at(5000, 5500, 900, 1400),
            at(6000, 6600, 950, 1400),
        ];
        let o = outlook(&trace);
        assert_eq!(o.verdict, Verdict::NotConverging);
        assert_eq!(o.eta_ms, None);
        assert!(
            o.reason.starts_with("dirtying 1.4 GiB/s, link 1.1 GiB/s"),
            "{}",
            o.reason
        );
    }

    #[test]
    fn a_small_net_progress_is_slow() {
        // 1 GiB/s link, 960 MiB/s dirtied: 64 MiB/s net.
        let trace = [at(0, 0, 2048, 960), at(1000, 1024, 1984, 960)];
        let o = outlook(&trace);
        assert_eq!(o.verdict, Verdict::Slow, "{}", o.reason);
        assert!(o.eta_ms.is_some_and(|eta| eta > 20_000), "{o:?}");
    }

    #[test]
    fn nothing_sent_for_seconds_is_a_stall() {
        let mut trace = vec![at(0, 0, 4096, 0), at(1000, 512, 3584, 0)];
        for t in [2000, 3000, 4000] {
            let mut s = at(t, 512, 3584, 0);
            s.rate_bytes_s = 0;
            trace.push(s);
        }
        let o = outlook(&trace);
        assert_eq!(o.verdict, Verdict::Stalled, "{}", o.reason);
        assert_eq!(o.reason, "nothing sent for 3 s (3.5 GiB left)");
    }

    #[test]
    fn old_samples_leave_the_window_and_late_ones_are_ignored() {
        let mut c = Convergence::default();
        // Slow for a long time (a dirtying guest)...
        for t in 0..20 {
            c.observe(at(t * 1000, t * 100, 4000, 1000));
        }
        // ...then the guest calms down: the verdict follows within the window.
        for t in 20..32 {
            c.observe(at(t * 1000, 2000 + (t - 20) * 1024, 2000, 100));
        }
        assert_eq!(c.outlook(300).unwrap().verdict, Verdict::Converging);
        let before = c.outlook(300);
        c.observe(at(5000, 0, 4096, 9999));
        assert_eq!(
            c.outlook(300),
            before,
            "a sample from the past changes nothing"
        );
    }
}
