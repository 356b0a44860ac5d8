//! [`AnyStore`]: a type-erased [`Store`], for code that picks its store at run time (a URL on
//! the command line).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::key::Key;
use crate::record::{Record, Token};
use crate::store::{Claim, ClaimRequest, Completion, Store, WriteOutcome};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe mirror of [`Store`]; implemented for every store.
trait DynStore: Send + Sync + 'static {
    fn claim<'a>(&'a self, req: &'a ClaimRequest) -> BoxFuture<'a, Result<Claim, StoreError>>;
    fn claim_many<'a>(
        &'a self,
        reqs: &'a [ClaimRequest],
    ) -> BoxFuture<'a, Result<Vec<Claim>, StoreError>>;
    fn complete<'a>(&'a self, c: &'a Completion)
    -> BoxFuture<'a, Result<WriteOutcome, StoreError>>;
    fn complete_many<'a>(
        &'a self,
        cs: &'a [Completion],
    ) -> BoxFuture<'a, Result<Vec<WriteOutcome>, StoreError>>;
    fn release<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        retention: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>>;
    fn extend<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>>;
    fn fail<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        reason: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>>;
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    fn evict<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn purge_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>>;
    fn max_result_bytes(&self) -> usize;
}

impl<S: Store> DynStore for S {
    fn claim<'a>(&'a self, req: &'a ClaimRequest) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(Store::claim(self, req))
    }
    fn claim_many<'a>(
        &'a self,
        reqs: &'a [ClaimRequest],
    ) -> BoxFuture<'a, Result<Vec<Claim>, StoreError>> {
        Box::pin(Store::claim_many(self, reqs))
    }
    fn complete<'a>(
        &'a self,
        c: &'a Completion,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>> {
        Box::pin(Store::complete(self, c))
    }
    fn complete_many<'a>(
        &'a self,
        cs: &'a [Completion],
    ) -> BoxFuture<'a, Result<Vec<WriteOutcome>, StoreError>> {
        Box::pin(Store::complete_many(self, cs))
    }
    fn release<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        retention: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>> {
        Box::pin(Store::release(self, key, token, retention))
    }
    fn extend<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>> {
        Box::pin(Store::extend(self, key, token, lease))
    }
    fn fail<'a>(
        &'a self,
        key: &'a Key,
        token: Token,
        reason: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<WriteOutcome, StoreError>> {
        Box::pin(Store::fail(self, key, token, reason, retention))
    }
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(Store::get(self, key))
    }
    fn evict<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::evict(self, key))
    }
    fn purge_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(Store::purge_expired(self, limit))
    }
    fn max_result_bytes(&self) -> usize {
        Store::max_result_bytes(self)
    }
}

/// Any [`Store`] behind one type, chosen at run time. Clones share the store.
///
/// Costs one boxed future per operation; code that knows its store type at compile time should
/// use it directly.
///
/// ```
/// use idem::{AnyStore, MemoryStore};
/// let store: AnyStore = AnyStore::new(MemoryStore::new());
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct AnyStore {
    inner: Arc<dyn DynStore>,
    name: Arc<str>,
}

impl AnyStore {
    /// Erases the type of `store`.
    pub fn new<S: Store>(store: S) -> Self {
        Self {
            inner: Arc::new(store),
            name: std::any::type_name::<S>()
                .rsplit("::")
                .next()
                .unwrap_or("store")
                .into(),
        }
    }

    /// The type name of the store inside, for logs.
    pub fn type_name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyStore").field(&self.name).finish()
    }
}

impl Store for AnyStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.inner.claim(req).await
    }
    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        self.inner.claim_many(reqs).await
    }
    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        self.inner.complete(c).await
    }
    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        self.inner.complete_many(cs).await
    }
    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.inner.release(key, token, retention).await
    }
    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.inner.extend(key, token, lease).await
    }
    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.inner.fail(key, token, reason, retention).await
    }
    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        self.inner.evict(key).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.purge_expired(limit).await
    }
    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes()
    }
}
