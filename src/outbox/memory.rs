//! The in-memory outbox table (no store configured: tests, demos). Same
//! rules as the durable tables; nothing survives the process.

use std::collections::{BTreeMap, HashMap};

use super::{Finish, Item, ItemState, KindStats, NewItem, OutboxTable, OutboxTx};

#[derive(Default)]
pub(super) struct MemoryTable {
    items: BTreeMap<i64, Item>,
    finished_unix_ms: HashMap<i64, i64>,
    by_key: HashMap<String, i64>,
    state: BTreeMap<(String, String), Vec<u8>>,
    next_id: i64,
}

impl OutboxTable for MemoryTable {
    fn transaction(
        &mut self,
        ops: &mut dyn FnMut(&mut dyn OutboxTx) -> Result<(), String>,
    ) -> Result<(), String> {
        ops(self)
    }
}

impl OutboxTx for MemoryTable {
    fn find_key(&mut self, key: &str) -> Result<Option<(i64, ItemState)>, String> {
        Ok(self
            .by_key
            .get(key)
            .and_then(|id| self.items.get(id))
            .map(|i| (i.id, i.state)))
    }

    fn insert(&mut self, item: &NewItem, now_ms: i64) -> Result<i64, String> {
        self.next_id += 1;
        let id = self.next_id;
        self.items.insert(
            id,
            Item {
                id,
                kind: item.kind.to_string(),
                target: item.target.clone(),
                method: item.method.clone(),
                headers: item.headers.clone(),
                body: item.body.clone(),
                dedupe_key: item.dedupe_key.clone(),
                state: ItemState::Pending,
                attempts: 0,
                created_unix_ms: now_ms,
                next_attempt_unix_ms: now_ms,
                last_error: None,
            },
        );
        self.by_key.insert(item.dedupe_key.clone(), id);
        Ok(id)
    }

    fn finish(&mut self, id: i64, attempts: u32, how: &Finish, now_ms: i64) -> Result<(), String> {
        let Some(item) = self
            .items
            .get_mut(&id)
            .filter(|i| i.state == ItemState::Pending)
        else {
            return Ok(());
        };
        item.attempts = attempts;
        match how {
            Finish::Done => {
                item.state = ItemState::Done;
                self.finished_unix_ms.insert(id, now_ms);
            }
            Finish::Retry {
                next_unix_ms,
                error,
            } => {
                item.next_attempt_unix_ms = *next_unix_ms;
                item.last_error = Some(error.clone());
            }
            Finish::GaveUp { error } => {
                item.state = ItemState::GaveUp;
                item.last_error = Some(error.clone());
                self.finished_unix_ms.insert(id, now_ms);
            }
        }
        Ok(())
    }

    fn put_state(&mut self, ns: &str, key: &str, value: &[u8]) -> Result<(), String> {
        self.state
            .insert((ns.to_string(), key.to_string()), value.to_vec());
        Ok(())
    }

    fn delete_state(&mut self, ns: &str, key: &str) -> Result<(), String> {
        self.state.remove(&(ns.to_string(), key.to_string()));
        Ok(())
    }

    fn due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Item>, String> {
        let mut due: Vec<Item> = self
            .items
            .values()
            .filter(|i| i.state == ItemState::Pending && i.next_attempt_unix_ms <= now_ms)
            .cloned()
            .collect();
        due.sort_by_key(|i| (i.next_attempt_unix_ms, i.id));
        due.truncate(limit);
        Ok(due)
    }

    fn list(&mut self, state: ItemState, limit: usize) -> Result<Vec<Item>, String> {
        Ok(self
            .items
            .values()
            .filter(|i| i.state == state)
            .take(limit)
            .cloned()
            .collect())
    }

    fn stats(&mut self) -> Result<Vec<(String, KindStats)>, String> {
        let mut by_kind: BTreeMap<String, KindStats> = BTreeMap::new();
        for i in self.items.values() {
            let s = by_kind.entry(i.kind.clone()).or_default();
            match i.state {
                ItemState::Pending => {
                    s.pending += 1;
                    s.oldest_created_unix_ms = Some(
                        s.oldest_created_unix_ms
                            .map_or(i.created_unix_ms, |t| t.min(i.created_unix_ms)),
                    );
                }
                ItemState::GaveUp => s.given_up += 1,
                ItemState::Done => {}
            }
        }
        Ok(by_kind.into_iter().collect())
    }

    fn state_rows(&mut self, ns: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        Ok(self
            .state
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn purge_finished(&mut self, before_ms: i64) -> Result<usize, String> {
        let old: Vec<i64> = self
            .items
            .values()
            .filter(|i| {
                i.state == ItemState::Done
                    && self
                        .finished_unix_ms
                        .get(&i.id)
                        .is_some_and(|t| *t < before_ms)
            })
            .map(|i| i.id)
            .collect();
        for id in &old {
            if let Some(i) = self.items.remove(id) {
                self.by_key.remove(&i.dedupe_key);
            }
            self.finished_unix_ms.remove(id);
        }
        Ok(old.len())
    }

    fn pending_count(&mut self) -> Result<u64, String> {
        Ok(self
            .items
            .values()
            .filter(|i| i.state == ItemState::Pending)
            .count() as u64)
    }
}
