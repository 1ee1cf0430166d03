"""A real HTTP server on 127.0.0.1 serving GPT-2 model files, misbehaving on demand.

http.server.ThreadingHTTPServer with a handler that implements Range requests
(206 + Content-Range, 416 past the end, If-Range) and can drop the connection
mid-body, announce more bytes than it sends, send no length and close early,
ignore Range, answer 404/500, stall, trickle a byte at a time, or serve a
captive portal's HTML page or a corrupt file. Used by test_download.py.
"""
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from test_model_files import PORTAL


class Server:
    """Serves `files` under /<remote model name>/<file>; records every request."""

    def __init__(self, files, remote="124M"):
        self.files = {f"/{remote}/{name}": data for name, data in files.items()}
        self.requests = []          # (path, Range header or None)
        self.if_ranges = []         # (path, If-Range header or None)
        self.etags = {}             # path -> ETag to send (and to honour in If-Range)
        self.drop_after = {}        # path -> bytes to send before a reset, once each
        self.before_drop = None     # called before the reset (lets the client read first)
        self.truncate_to = {}       # path -> bytes to send (full Content-Length), once each
        self.fail_status = {}       # path -> [status codes to answer first]
        self.stall_s = {}           # path -> seconds to wait before answering, once
        self.short_by = {}          # path -> bytes each body falls short of Content-Length
        self.no_length = set()      # paths sent without Content-Length (end = close)
        self.cut_no_length = {}     # path -> bytes to send without a length, then close
        self.bad_bodies = {}        # path -> [bodies to serve first, one per request]
        self.portal = set()         # paths answered with a captive portal's login page
        self.trickle = set()        # paths sent a byte at a time, forever
        self.ignore_range = False
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    server.handle(self)
                except ConnectionError:  # the client went away (e.g. the Ctrl-C test)
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.stopping.set()  # ends stalls and trickles
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, path_end):
        return [r for p, r in self.requests if p.endswith(path_end)]

    def handle(self, h):
        path = h.path
        with self.lock:
            self.requests.append((path, h.headers.get("Range")))
            self.if_ranges.append((path, h.headers.get("If-Range")))
            statuses = self.fail_status.get(path)
            status = statuses.pop(0) if statuses else None
            drop = self.drop_after.pop(path, None)
            truncate = self.truncate_to.pop(path, None)
            stall = self.stall_s.pop(path, None)
            bad = self.bad_bodies.get(path)
            bad = bad.pop(0) if bad else None
            cut_no_length = self.cut_no_length.pop(path, None)
        if stall:
            self.stopping.wait(stall)
        if path in self.portal:
            h.send_response(200)  # whatever was asked: a portal answers with its page
            h.send_header("Content-Type", "text/html; charset=utf-8")
            h.send_header("Content-Length", str(len(PORTAL)))
            h.end_headers()
            h.wfile.write(PORTAL)
            return
        data = self.files.get(path) if bad is None else bad
        if status is not None or data is None:
            status = status or 404
            body = b"no such file\n" if status == 404 else b"oops\n"
            h.send_response(status)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        start, code = 0, 200
        rng = h.headers.get("Range")
        etag = self.etags.get(path)
        if_range = h.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            rng = None  # RFC 9110: the file changed, so send all of it
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            code = 206
        body = data[start:]
        h.send_response(code)
        h.send_header("Content-Type", "application/octet-stream")
        if cut_no_length is not None or path in self.no_length:
            # No length: the body ends when the connection closes.
            h.end_headers()
            h.wfile.write(body if cut_no_length is None else body[:cut_no_length])
            h.close_connection = True
            return
        h.send_header("Content-Length", str(len(body)))
        if etag:
            h.send_header("ETag", etag)
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if drop is not None:
            h.wfile.write(body[:drop])
            h.wfile.flush()
            if self.before_drop:
                self.before_drop()
            # RST instead of FIN: what a dropped connection looks like to the client.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            h.close_connection = True
            return
        if truncate is not None or path in self.short_by:
            cut = truncate if truncate is not None else len(body) - self.short_by[path]
            h.wfile.write(body[:max(0, cut)])
            h.close_connection = True   # a clean close, short of Content-Length
            return
        if path in self.trickle:
            for i in range(len(body)):
                if self.stopping.wait(0.01):
                    break
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)
