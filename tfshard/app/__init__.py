"""tfshard's applications, built on the library (which never imports them)."""
