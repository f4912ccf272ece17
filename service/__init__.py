"""The FastAPI service (issue 6): mint, retrieve, manage experts, complete text through the runtime."""
