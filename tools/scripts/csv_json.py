"""csv_json tool: CSV <-> JSON array of objects. Arguments arrive as JSON on stdin."""
import csv
import io
import json
import sys

args = json.load(sys.stdin)
data, direction = args["data"], args["direction"]
if direction == "csv_to_json":
    rows = list(csv.DictReader(io.StringIO(data)))
    print(json.dumps(rows, ensure_ascii=False))
else:
    try:
        rows = json.loads(data)
    except json.JSONDecodeError as error:
        sys.exit(f"data is not JSON: {error}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        sys.exit("data must be a JSON array of objects")
    fields = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sys.stdout.write(out.getvalue())
