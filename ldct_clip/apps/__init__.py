"""Applications built on the core library: the PACS listener, demo and reports."""
