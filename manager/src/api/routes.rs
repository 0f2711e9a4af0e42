//! The route table: the one list of every HTTP route, from which both the axum router
//! (`api::router`) and the OpenAPI document are built, so the document cannot describe a
//! route the server lacks or miss one it has. Paths are in the OpenAPI form, which is
//! also axum's: literal segments and `{name}` segments.

/// What a route does; the dispatcher matches on it exhaustively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Dashboard,
    OpenApi,
    Metrics,
    Events,
    Health,
    Status,
    ListNodes,
    GetNode,
    SyncNode,
    CreateNode,
    RemoveNode,
    ListFiles,
    FileHistory,
    FileVersions,
    Trash,
    Restore,
    Conflicts,
    Changes,
    ListVms,
    CreateVm,
    RemoveVm,
}

/// A query parameter, for the OpenAPI document.
#[derive(Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub required: bool,
    /// OpenAPI type: `string` or `integer`.
    pub kind: &'static str,
    pub description: &'static str,
}

pub struct Route {
    pub method: &'static str,
    /// Path template in OpenAPI form, e.g. `/api/nodes/{id}`.
    pub path: &'static str,
    pub op: Op,
    /// Public routes need no operator token (the static page and the API description).
    pub public: bool,
    pub summary: &'static str,
    pub query: &'static [Param],
    /// Name of the request body's schema in the OpenAPI components, if it takes one.
    pub body: Option<&'static str>,
    /// Status and schema name of the success response (`text` for non-JSON bodies).
    pub ok: (u16, &'static str),
}

const PAGING: [Param; 2] = [
    Param { name: "offset", required: false, kind: "integer", description: "Entries to skip (default 0); past the end is an error (422)." },
    Param { name: "limit", required: false, kind: "integer", description: "Most entries returned: 1 to 1000 (default 100)." },
];

pub const ROUTES: &[Route] = &[
    Route { method: "GET", path: "/", op: Op::Dashboard, public: true, summary: "The web dashboard (HTML).", query: &[], body: None, ok: (200, "text") },
    Route {
        method: "GET",
        path: "/api/openapi.json",
        op: Op::OpenApi,
        public: true,
        summary: "This OpenAPI document.",
        query: &[],
        body: None,
        ok: (200, "OpenApi"),
    },
    Route {
        method: "GET",
        path: "/metrics",
        op: Op::Metrics,
        public: false,
        summary: "Prometheus metrics (OpenMetrics text format).",
        query: &[],
        body: None,
        ok: (200, "text"),
    },
    Route {
        method: "GET",
        path: "/api/events",
        op: Op::Events,
        public: false,
        summary: "Server-sent events: status, nodes, transfers, changes, conflicts. Browsers may pass the operator token as ?token=.",
        query: &[Param { name: "token", required: false, kind: "string", description: "Operator token, for clients (EventSource) that cannot send headers." }],
        body: None,
        ok: (200, "text"),
    },
    Route {
        method: "GET",
        path: "/api/health",
        op: Op::Health,
        public: false,
        summary: "Whether the manager is making progress; 503 while it is stuck on work it took up. Never waits on the database.",
        query: &[],
        body: None,
        ok: (200, "Health"),
    },
    Route {
        method: "GET",
        path: "/api/status",
        op: Op::Status,
        public: false,
        summary: "Head revision and counts.",
        query: &[],
        body: None,
        ok: (200, "Status"),
    },
    Route {
        method: "GET",
        path: "/api/nodes",
        op: Op::ListNodes,
        public: false,
        summary: "Every node the manager has heard from.",
        query: &[],
        body: None,
        ok: (200, "NodeList"),
    },
    Route {
        method: "POST",
        path: "/api/nodes",
        op: Op::CreateNode,
        public: false,
        summary: "Start a new node in a container (provisioning).",
        query: &[],
        body: Some("CreateNode"),
        ok: (201, "Provisioned"),
    },
    Route { method: "GET", path: "/api/nodes/{id}", op: Op::GetNode, public: false, summary: "One node.", query: &[], body: None, ok: (200, "Node") },
    Route {
        method: "DELETE",
        path: "/api/nodes/{id}",
        op: Op::RemoveNode,
        public: false,
        summary: "Stop and remove a provisioned node.",
        query: &[],
        body: None,
        ok: (200, "Provisioned"),
    },
    Route {
        method: "POST",
        path: "/api/nodes/{id}/sync",
        op: Op::SyncNode,
        public: false,
        summary: "Ask a node to run a sync now.",
        query: &[],
        body: None,
        ok: (202, "Accepted"),
    },
    Route {
        method: "GET",
        path: "/api/files",
        op: Op::ListFiles,
        public: false,
        summary: "Current paths (deleted ones left out), sorted, with paging.",
        query: &[Param { name: "prefix", required: false, kind: "string", description: "Only paths starting with this string." }, PAGING[0], PAGING[1]],
        body: None,
        ok: (200, "FileList"),
    },
    Route {
        method: "GET",
        path: "/api/files/history",
        op: Op::FileHistory,
        public: false,
        summary: "One path's revisions and its current holders.",
        query: &[Param { name: "path", required: true, kind: "string", description: "The path, relative to the synced root." }],
        body: None,
        ok: (200, "FileHistory"),
    },
    Route {
        method: "GET",
        path: "/api/files/versions",
        op: Op::FileVersions,
        public: false,
        summary: "One path's current state and kept old versions, newest first, each with its keepers and whether it can be restored now.",
        query: &[Param { name: "path", required: true, kind: "string", description: "The path, relative to the synced root." }],
        body: None,
        ok: (200, "Versions"),
    },
    Route {
        method: "GET",
        path: "/api/trash",
        op: Op::Trash,
        public: false,
        summary: "Deleted files and directories (the roots of what was removed) within the retention, newest first.",
        query: &[Param { name: "dir", required: false, kind: "string", description: "Only what was deleted below this directory." }],
        body: None,
        ok: (200, "Trash"),
    },
    Route {
        method: "POST",
        path: "/api/restore",
        op: Op::Restore,
        public: false,
        summary: "Bring a path (a directory with its tree) back as it was at a revision, as new changes every node takes; a path changed since `base` gets the restored version beside it.",
        query: &[],
        body: Some("RestoreRequest"),
        ok: (200, "Restored"),
    },
    Route {
        method: "GET",
        path: "/api/conflicts",
        op: Op::Conflicts,
        public: false,
        summary: "Conflict files, newest first.",
        query: &PAGING,
        body: None,
        ok: (200, "ConflictList"),
    },
    Route {
        method: "GET",
        path: "/api/changes",
        op: Op::Changes,
        public: false,
        summary: "Accepted changes after a revision, oldest first (without `since`: the latest ones).",
        query: &[
            Param { name: "since", required: false, kind: "integer", description: "Only revisions greater than this; beyond the head is an error (422)." },
            PAGING[1],
        ],
        body: None,
        ok: (200, "ChangeList"),
    },
    Route {
        method: "GET",
        path: "/api/vms",
        op: Op::ListVms,
        public: false,
        summary: "Virtual machines started by the manager.",
        query: &[],
        body: None,
        ok: (200, "VmList"),
    },
    Route {
        method: "POST",
        path: "/api/vms",
        op: Op::CreateVm,
        public: false,
        summary: "Start a virtual machine (EC2) running a node.",
        query: &[],
        body: Some("CreateVm"),
        ok: (201, "Provisioned"),
    },
    Route {
        method: "DELETE",
        path: "/api/vms/{id}",
        op: Op::RemoveVm,
        public: false,
        summary: "Terminate a virtual machine.",
        query: &[],
        body: None,
        ok: (200, "Provisioned"),
    },
];

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(seen.insert((r.method, r.path)), "{r:?} twice");
        }
    }
}
