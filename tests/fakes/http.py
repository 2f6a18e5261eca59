"""HTTP plumbing the fake APIs share: a threaded loopback server that tolerates clients giving up, and a
handler base that logs nothing, turns Nagle off and tracks its keep-alive connections on the fake (in
``fake._conns`` under ``fake.lock``) so that ``close_connections`` can end them when the fake stops."""
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients that gave up are fine
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
        with self.server.fake.lock:
            self.server.fake._conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.fake.lock:
                self.server.fake._conns.discard(self.connection)

    def drop(self):
        """Close the connection without any response (a request whose answer is lost)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def close_connections(fake):
    """End the keep-alive connections of clients that are still open."""
    with fake.lock:
        conns, fake._conns = list(fake._conns), set()
    for conn in conns:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
