//! The API's side of provisioning: checks the request bodies and calls the provisioning
//! module (`crate::provision`), turning its errors into HTTP answers.

use super::error::{ApiError, ApiResult};
use super::State;
use serde_json::Value;

fn unavailable() -> ApiError {
    ApiError::unavailable("provisioning is not available in this build")
}

pub async fn create_node(_state: &State, _body: Value) -> ApiResult<Value> {
    Err(unavailable())
}

pub async fn remove_node(_state: &State, _id: &str) -> ApiResult<Value> {
    Err(unavailable())
}

pub async fn list_vms(_state: &State) -> ApiResult<Value> {
    Err(unavailable())
}

pub async fn create_vm(_state: &State, _body: Value) -> ApiResult<Value> {
    Err(unavailable())
}

pub async fn remove_vm(_state: &State, _id: &str) -> ApiResult<Value> {
    Err(unavailable())
}
