"""Scrapes coremq's metrics endpoint for tests/metrics.rs, parsing what it
serves with the Prometheus project's own Python text parser.

    python prom_scrape.py URL
        GETs URL, parses the body with prometheus_client.parser and prints
        one flat JSON object: {"status": 200, "content_type": "...",
        "s:NAME{label=value}": value, ..., "t:FAMILY": "counter", ...}
        (s: a sample, t: a family's type). A body the parser refuses prints
        {"error": "..."} and exits 1.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main():
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=5) as r:
        status = r.status
        content_type = r.headers.get("Content-Type", "")
        body = r.read().decode()
    out = {"status": status, "content_type": content_type}
    try:
        for family in text_string_to_metric_families(body):
            out[f"t:{family.name}"] = family.type
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                key = f"{s.name}{{{labels}}}" if labels else s.name
                out[f"s:{key}"] = s.value
    except Exception as e:  # the parser's refusal is the test's failure
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    print(json.dumps(out))


main()
