//! The one way kproxy talks to nftables: apply a transaction atomically, read a table
//! back. The netlink backend ([`super::netlink::Netlink`]) and the in-memory fake
//! ([`super::fake::FakeNft`]) both implement it, so [`super::dataplane::NftDataplane`]
//! and everything above it are unit-tested without root.

use super::existing::{Existing, TableContents};
use super::transaction::{Family, Op, Set, Transaction};

/// An nftables implementation: the kernel over netlink, or a fake.
pub trait NftInterface: Send {
    /// Why an operation failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `tx` atomically: every operation, or (on error) none.
    fn apply(&mut self, tx: &Transaction) -> Result<(), Self::Error>;

    /// Reads back one table; `None` when it does not exist.
    fn read_table(&mut self, family: Family, table: &str) -> Result<Option<Existing>, Self::Error>;

    /// Reads back a whole table for a layout that diffs against it: every chain with
    /// its rules' comments, the set names, and the elements (typed: data values,
    /// interval ends, verdicts; without comments) of every set for which `declared`
    /// gives the declaration to decode them with. `None` when the table does not exist.
    fn read_contents(
        &mut self,
        family: Family,
        table: &str,
        declared: &dyn Fn(&str) -> Option<Set>,
    ) -> Result<Option<TableContents>, Self::Error>;

    /// The network namespace's nftables generation (it grows by one with every
    /// committed batch, anyone's); `None` when unknown. The default says unknown, so
    /// callers that skip work when nothing changed never skip it.
    fn generation(&mut self) -> Result<Option<u32>, Self::Error> {
        Ok(None)
    }

    /// Whether one chain of a table exists (cheaper than reading the table back).
    fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, Self::Error>;

    /// Whether an error says the object does not exist (so deleting it is done).
    fn is_not_found(e: &Self::Error) -> bool;

    /// Deletes a table; a table that is not there is fine.
    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), Self::Error> {
        let mut tx = Transaction::new(family, table);
        tx.push(Op::DeleteTable);
        match self.apply(&tx) {
            Err(e) if Self::is_not_found(&e) => Ok(()),
            other => other,
        }
    }
}
