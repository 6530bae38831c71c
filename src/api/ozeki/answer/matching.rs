//! Which report is which message's: pairs the gateway's accept reports
//! with the messages tollgate priced, so each message's share of the
//! reservation is posted (accepted), voided (rejected) or kept in doubt
//! (no report it can be sure of).

use std::collections::{HashMap, VecDeque};

use super::AcceptReport;
use crate::api::ozeki::command::OutgoingMessage;

/// Per message: `Some(true)` accepted (status 0), `Some(false)` rejected,
/// `None` no usable report (the caller keeps that reservation in doubt).
///
/// Non-batch: reports are matched by recipient, exactly first, then by
/// digits only (`+3620…` = `003620…` = `3620…`); each report and each
/// message is used once, in order, so duplicated recipients pair up in
/// order. Batch: by index; a report without index falls back to its
/// recipient. A message with contradicting reports (same index, different
/// outcomes, or an index whose recipient is not that message's) gets `None`.
pub fn match_reports(
    messages: &[OutgoingMessage],
    batch: bool,
    reports: &[AcceptReport],
) -> Vec<Option<bool>> {
    let mut slots = vec![Slot::Free; messages.len()];
    let mut by_recipient = Vec::with_capacity(reports.len());
    for report in reports {
        let accepted = report.status_code == 0;
        match (batch, report.index) {
            (true, Some(i)) if i < messages.len() => {
                let consistent = report.recipient.as_deref().is_none_or(|r| {
                    r == messages[i].recipient
                        || normalise(r)
                            .is_some_and(|n| Some(n) == normalise(&messages[i].recipient))
                });
                slots[i] = match (slots[i], consistent) {
                    (Slot::Free, true) => Slot::Set(accepted),
                    (Slot::Set(prev), true) if prev == accepted => Slot::Set(prev),
                    _ => Slot::Conflict,
                };
            }
            (true, Some(_)) => {} // an index we never sent: ignored
            _ => {
                if let Some(r) = report.recipient.as_deref() {
                    by_recipient.push((r, accepted));
                }
            }
        }
    }
    match_by_recipient(messages, &mut slots, &by_recipient);
    slots
        .into_iter()
        .map(|s| match s {
            Slot::Set(accepted) => Some(accepted),
            Slot::Free | Slot::Conflict => None,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Set(bool),
    Conflict,
}

/// Assigns recipient-keyed reports to free slots: an exact pass, then a
/// digits-only pass for the leftovers. Queues keep this O(messages + reports)
/// for 20 000-recipient answers.
fn match_by_recipient(messages: &[OutgoingMessage], slots: &mut [Slot], reports: &[(&str, bool)]) {
    if reports.is_empty() {
        return;
    }
    let mut exact: HashMap<&str, VecDeque<usize>> = HashMap::new();
    let mut digits: HashMap<String, VecDeque<usize>> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        if slots[i] == Slot::Free {
            exact.entry(m.recipient.as_str()).or_default().push_back(i);
            if let Some(n) = normalise(&m.recipient) {
                digits.entry(n).or_default().push_back(i);
            }
        }
    }
    let take = |queue: Option<&mut VecDeque<usize>>, slots: &[Slot]| {
        let queue = queue?;
        while let Some(i) = queue.pop_front() {
            if slots[i] == Slot::Free {
                return Some(i);
            }
        }
        None
    };
    let mut leftovers = Vec::new();
    for &(recipient, accepted) in reports {
        match take(exact.get_mut(recipient), slots) {
            Some(i) => slots[i] = Slot::Set(accepted),
            None => leftovers.push((recipient, accepted)),
        }
    }
    for (recipient, accepted) in leftovers {
        let Some(key) = normalise(recipient) else {
            continue;
        };
        if let Some(i) = take(digits.get_mut(&key), slots) {
            slots[i] = Slot::Set(accepted);
        }
    }
}

/// Digits only, without an international `00` prefix; `None` if no digit.
fn normalise(recipient: &str) -> Option<String> {
    let digits: String = recipient.chars().filter(char::is_ascii_digit).collect();
    let digits = match digits.strip_prefix("00") {
        Some(rest) if recipient.trim_start().starts_with("00") => rest.to_string(),
        _ => digits,
    };
    (!digits.is_empty()).then_some(digits)
}
