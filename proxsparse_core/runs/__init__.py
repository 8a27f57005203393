"""What a run leaves on disk and takes home: run-folder files, the one run-folder reader,
export, the report and its charts."""
