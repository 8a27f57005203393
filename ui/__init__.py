"""The Gradio front end of ProxSparse Studio: tabs, handlers and the server-side job manager."""
