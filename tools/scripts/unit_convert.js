// unit_convert tool: arguments arrive as JSON on stdin, the result goes to stdout.
const args = JSON.parse(std.in.readAsString());
const linear = {
  length: { mm: 0.001, cm: 0.01, m: 1, km: 1000, in: 0.0254, ft: 0.3048, mi: 1609.344 },
  mass: { g: 0.001, kg: 1, lb: 0.45359237, oz: 0.028349523125 },
};
const toKelvin = { C: (v) => v + 273.15, F: (v) => (v - 32) * 5 / 9 + 273.15, K: (v) => v };
const fromKelvin = { C: (v) => v - 273.15, F: (v) => (v - 273.15) * 9 / 5 + 32, K: (v) => v };

function convert(value, from, to) {
  if (from in toKelvin && to in toKelvin) return fromKelvin[to](toKelvin[from](value));
  for (const table of Object.values(linear)) {
    if (from in table && to in table) return value * table[from] / table[to];
  }
  throw new Error(`cannot convert ${from} to ${to}: different kinds of quantity`);
}

try {
  const result = convert(args.value, args.from, args.to);
  console.log(JSON.stringify({ value: Number(result.toPrecision(12)), unit: args.to }));
} catch (error) {
  std.err.puts(String(error.message) + "\n");
  std.exit(1);
}
