"""The bridge's work-around for LitServe's ZMQ publisher, on a real broker and real sockets."""

from __future__ import annotations

import asyncio

from litserve.transport.zmq_queue import AsyncConsumer, Broker

from server.bridge import _ZMQTransport

MESSAGE = ("uid", ("a line\n", "OK", "streaming", 0))


def first_message_at_consumer_0(transport_class) -> object:
    """What HTTP process 0's reader gets first when a worker starts publishing after it subscribed
    (or the exception it dies of). The broker's thread runs on until the test process ends (its
    proxy has no stop)."""
    broker = Broker()
    broker.start()

    async def run():
        consumer = AsyncConsumer(consumer_id=0, address=broker.frontend_address)
        await asyncio.sleep(0.1)                          # the subscription reaches the broker first
        worker = transport_class(backend_address=broker.backend_address, frontend_address=broker.frontend_address)
        worker.send(MESSAGE, consumer_id=0)
        try:
            return await consumer.get(timeout=5)
        except Exception as e:                           # LitServe's reader task stops for good on this
            return e
        finally:
            consumer.close()
            worker.close()
    return asyncio.run(run())


def test_our_publisher_sends_consumer_0_only_real_messages():
    """LitServe's own publisher pings consumer 0 with b"__ping__" as it starts; when the ping wins the
    race with the connection (about one server start in ten here), that HTTP process's reader dies
    on it. Ours sends nothing but the messages."""
    for _ in range(10):
        assert first_message_at_consumer_0(_ZMQTransport) == MESSAGE
