"""A vhost-user front-end for tests and benchmarks: a guest without a guest.

`frontend.BlkFrontend` connects to a vhost-user-blk backend's socket the way QEMU 7.2 does,
shares a memfd as guest memory, lays out split virtqueues in it and submits virtio-blk requests
with any descriptor layout, so tests control exactly what is in flight and in what order.
`protocol` speaks the vhost-user messages, `virtqueue` owns guest memory and the rings.
"""
