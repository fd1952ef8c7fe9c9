"""bus: see DESIGN.md. Filled by a later issue; importable on its own."""
