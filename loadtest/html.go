package loadtest

import (
	"fmt"
	"html/template"
	"io"
	"strconv"
	"strings"
)

// WriteHTML writes a self-contained HTML page: the summary, line charts
// over time (inline SVG, no scripts) and the percentile tables.
func (r *Report) WriteHTML(w io.Writer) error {
	var summary strings.Builder
	if err := r.WriteSummary(&summary); err != nil {
		return err
	}
	xs := make([]float64, len(r.Series))
	col := func(f func(Point) float64) []float64 {
		out := make([]float64, len(r.Series))
		for i, p := range r.Series {
			out[i] = f(p)
		}
		return out
	}
	for i, p := range r.Series {
		xs[i] = p.T
	}
	data := struct {
		R       *Report
		Summary string
		Charts  []template.HTML
		Tables  []latencyTable
	}{R: r, Summary: summary.String()}
	data.Charts = []template.HTML{
		svgChart("Deliveries and publishes per second", "msgs/s", xs, []series{
			{"deliveries/s", "#1f77b4", col(func(p Point) float64 { return p.DeliveriesPerSec })},
			{"publishes/s", "#2ca02c", col(func(p Point) float64 { return p.PublishesPerSec })},
		}),
		svgChart("Publish→deliver latency", "ms", xs, []series{
			{"p50", "#2ca02c", col(func(p Point) float64 { return p.P50Ms })},
			{"p99", "#ff7f0e", col(func(p Point) float64 { return p.P99Ms })},
			{"max", "#d62728", col(func(p Point) float64 { return p.MaxMs })},
		}),
		svgChart("Connected bots", "bots", xs, []series{
			{"connected", "#9467bd", col(func(p Point) float64 { return float64(p.Connected) })},
		}),
		svgChart("Failed requests per second", "failed", xs, []series{
			{"failed", "#d62728", col(func(p Point) float64 { return float64(p.Failed) })},
		}),
	}
	for _, name := range []string{"deliver", "join", "connect"} {
		data.Tables = append(data.Tables, latencyTable{Name: name, L: r.Latency[name]})
	}
	return htmlPage.Execute(w, data)
}

type latencyTable struct {
	Name string
	L    LatencySummary
}

type series struct {
	name  string
	color string
	ys    []float64
}

// svgChart draws a line chart of several series over the same xs. Only
// numbers and fixed strings go into the SVG, so it is safe to mark as HTML.
func svgChart(title, unit string, xs []float64, ss []series) template.HTML {
	const w, h, left, right, top, bottom = 720.0, 240.0, 60.0, 130.0, 30.0, 30.0
	pw, ph := w-left-right, h-top-bottom
	xmax, ymax := 1.0, 0.0
	for _, x := range xs {
		xmax = max(xmax, x)
	}
	for _, s := range ss {
		for _, y := range s.ys {
			ymax = max(ymax, y)
		}
	}
	if ymax <= 0 {
		ymax = 1
	}
	ymax *= 1.05
	var b strings.Builder
	esc := template.HTMLEscapeString
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%g" height="%g" viewBox="0 0 %g %g" role="img">`, w, h, w, h)
	fmt.Fprintf(&b, `<text x="%g" y="18" font-size="14" font-weight="bold">%s</text>`, left, esc(title))
	fmt.Fprintf(&b, `<rect x="%g" y="%g" width="%g" height="%g" fill="none" stroke="#999"/>`, left, top, pw, ph)
	for i := 0; i <= 4; i++ {
		y := top + ph*float64(i)/4
		v := ymax * float64(4-i) / 4
		fmt.Fprintf(&b, `<line x1="%g" y1="%.1f" x2="%g" y2="%.1f" stroke="#eee"/>`, left, y, left+pw, y)
		fmt.Fprintf(&b, `<text x="%g" y="%.1f" font-size="10" text-anchor="end">%s</text>`, left-4, y+3, tickLabel(v))
	}
	fmt.Fprintf(&b, `<text x="12" y="%g" font-size="10" transform="rotate(-90 12 %g)">%s</text>`, top+ph/2, top+ph/2, esc(unit))
	fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="10">0s</text><text x="%g" y="%g" font-size="10" text-anchor="end">%.0fs</text>`,
		left, h-10, left+pw, h-10, xmax)
	for i, s := range ss {
		var pts []string
		for j, y := range s.ys {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", left+pw*xs[j]/xmax, top+ph*(1-y/ymax)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`, s.color, strings.Join(pts, " "))
		ly := top + 14*float64(i) + 10
		fmt.Fprintf(&b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="%s" stroke-width="3"/>`, left+pw+10, ly, left+pw+28, ly, s.color)
		fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="11">%s</text>`, left+pw+32, ly+4, esc(s.name))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

var htmlPage = template.Must(template.New("report").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>imq loadtest {{.R.RunID}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
table { border-collapse: collapse; margin: 0 2em 1em 0; display: inline-table; vertical-align: top; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.bad { color: #b00; font-weight: bold; }
</style></head><body>
<h1>imq loadtest</h1>
<p>{{.R.URL}} · started {{.R.Started.Format "2006-01-02 15:04:05 MST"}} · {{printf "%.1f" .R.ElapsedSecs}} s</p>
{{if .R.AbortReason}}<p class="bad">Aborted: {{.R.AbortReason}}</p>{{end}}
{{if .R.RampStopped}}<p class="bad">Ramp stopped: {{.R.RampStopped}}</p>{{end}}
{{if .R.TotalViolations}}<p class="bad">{{.R.TotalViolations}} protocol violations</p>{{end}}
<h2>Summary</h2>
<pre>{{.Summary}}</pre>
<h2>Over time</h2>
{{range .Charts}}<div>{{.}}</div>
{{end}}
<h2>Latency percentiles (ms)</h2>
{{range .Tables}}<table><caption>{{.Name}} ({{.L.Count}} samples)</caption>
<tr><th>percentile</th><th>ms</th></tr>
{{range .L.Percentiles}}<tr><td>{{.P}}</td><td>{{printf "%.3f" .Ms}}</td></tr>
{{end}}<tr><td>mean</td><td>{{printf "%.3f" .L.MeanMs}}</td></tr>
</table>
{{end}}
</body></html>
`))

// tickLabel writes an axis value as a person reads it: 9070 as "9.07k",
// 1.69 as "1.69".
func tickLabel(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'g', 3, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'g', 3, 64) + "k"
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}
