"""Local stand-ins for Stripe's and Creem's APIs while schemathesis fuzzes the
REST gateway, so that purchase routes reach their own rules instead of
answering 503 "provider not configured". It answers the calls the service
makes with the smallest objects the service reads; it checks nothing.

Usage: python3 fake_providers.py PORT
"""

import itertools
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

counter = itertools.count(1)


def stripe(path, form):
    n = next(counter)
    if path == "/v1/customers":
        return {"id": f"cus_{n}", "object": "customer", "created": 1_800_000_000,
                "livemode": False, "metadata": {"org_id": form.get("metadata[org_id]")}}
    if path == "/v1/checkout/sessions":
        return {"id": f"cs_test_{n}", "object": "checkout.session",
                "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
                "client_reference_id": form.get("client_reference_id"),
                "created": 1_800_000_000, "expires_at": 1_800_086_400,
                "custom_fields": [], "custom_text": {}, "livemode": False,
                "mode": form.get("mode", "payment"), "payment_method_types": ["card"],
                "payment_status": "unpaid", "shipping_options": [], "status": "open",
                "url": f"https://checkout.stripe.test/c/pay/cs_test_{n}",
                "metadata": {"order_id": form.get("metadata[order_id]"),
                             "org_id": form.get("metadata[org_id]")}}
    if path == "/v1/billing_portal/sessions":
        return {"id": f"bps_{n}", "object": "billing_portal.session", "configuration": "bpc_1",
                "created": 1_800_000_000, "livemode": False, "customer": form.get("customer"),
                "return_url": form.get("return_url"), "url": f"https://billing.stripe.test/p/{n}"}
    return None


def creem(path, body):
    n = next(counter)
    if path == "/v1/checkouts":
        return {"id": f"ch_creem_{n}", "object": "checkout", "mode": "test",
                "product": body.get("product_id"), "request_id": body.get("request_id"),
                "status": "pending", "metadata": body.get("metadata"),
                "checkout_url": f"https://checkout.creem.test/ch_creem_{n}"}
    if path == "/v1/customers/billing":
        return {"customer_portal_link": f"https://creem.test/portal/{body.get('customer_id')}"}
    return None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = urllib.parse.urlsplit(self.path).path
        # The two APIs' paths do not overlap; Stripe's bodies are forms.
        if "json" in (self.headers.get("content-type") or ""):
            answer = creem(path, json.loads(raw or b"{}"))
        else:
            answer = stripe(path, dict(urllib.parse.parse_qsl(raw.decode())))
        data = json.dumps(answer or {"error": {"message": f"no such route {path}"}}).encode()
        self.send_response(200 if answer is not None else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
