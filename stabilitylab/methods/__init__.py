"""Self-supervised methods: each turns two views of a batch into a loss."""
