"""What a run leaves behind: results, reports, the state store, revisions."""
