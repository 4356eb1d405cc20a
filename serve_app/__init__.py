"""Ray Serve application for opsvlm (``serve_app.app:build_app``; configs beside it)."""
