//! Sources turn the outside world into store [`Change`](crate::store::Change) events: the
//! manifests directory ([`manifests`]) and the Kubernetes API ([`api`]). Both convert API
//! objects through [`convert`], where API types end.
pub mod api;
pub mod convert;
pub mod manifests;
