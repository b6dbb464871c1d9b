package loadtest

import (
	"fmt"
	"html/template"
	"io"
	"math"
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
	data := struct {
		R       *Report
		Summary string
		Charts  []template.HTML
		Tables  []latencyTable
	}{R: r, Summary: summary.String()}
	for _, c := range r.charts() {
		data.Charts = append(data.Charts, c.svg())
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

// chart is one line chart over the run's time series.
type chart struct {
	title, unit string
	// integer: the series are counts, so the y axis has integer ticks.
	integer bool
	xs      []float64 // seconds since the start
	series  []series
}

// series is one line; a NaN y is a gap (no data that second).
type series struct {
	name  string
	color string
	dash  string // SVG stroke-dasharray; empty for solid
	width float64
	ys    []float64
}

// charts returns the report's charts. Latency has two: p50 and p99 on a
// scale of their own, and max on another, so that a max far above p99
// does not flatten it, nor hide it when they are equal (a second with few
// deliveries). A second without deliveries is a gap in the latency
// charts, not a 0.
func (r *Report) charts() []chart {
	xs := make([]float64, len(r.Series))
	for i, p := range r.Series {
		xs[i] = p.T
	}
	col := func(f func(Point) float64) []float64 {
		out := make([]float64, len(r.Series))
		for i, p := range r.Series {
			out[i] = f(p)
		}
		return out
	}
	lat := func(f func(Point) float64) []float64 {
		return col(func(p Point) float64 {
			if p.LatencySamples == 0 {
				return math.NaN()
			}
			return f(p)
		})
	}
	return []chart{
		{title: "Deliveries and publishes per second", unit: "msgs/s", xs: xs, series: []series{
			{"deliveries/s", "#1f77b4", "", 2, col(func(p Point) float64 { return p.DeliveriesPerSec })},
			{"publishes/s", "#ff7f0e", "6 3", 2, col(func(p Point) float64 { return p.PublishesPerSec })},
		}},
		{title: "Publish→deliver latency: p50 and p99", unit: "ms", xs: xs, series: []series{
			{"p50", "#2ca02c", "", 2, lat(func(p Point) float64 { return p.P50Ms })},
			{"p99", "#d62728", "6 3", 2, lat(func(p Point) float64 { return p.P99Ms })},
		}},
		{title: "Publish→deliver latency: max", unit: "ms", xs: xs, series: []series{
			{"max", "#7f3f00", "", 1.5, lat(func(p Point) float64 { return p.MaxMs })},
		}},
		{title: "Connected bots", unit: "bots", integer: true, xs: xs, series: []series{
			{"connected", "#9467bd", "", 2, col(func(p Point) float64 { return float64(p.Connected) })},
		}},
		{title: "Failed requests per second", unit: "failed/s", integer: true, xs: xs, series: []series{
			{"failed", "#d62728", "", 2, col(func(p Point) float64 { return float64(p.Failed) })},
		}},
	}
}

// yAxis returns the chart's y ticks, from 0 to the top of its scale.
func (c chart) yAxis() []float64 {
	ymax := 0.0
	for _, s := range c.series {
		for _, y := range s.ys {
			if !math.IsNaN(y) {
				ymax = max(ymax, y)
			}
		}
	}
	return niceTicks(ymax, c.integer)
}

// svg draws the chart. Only numbers and fixed strings go into the SVG, so
// it is safe to mark as HTML.
func (c chart) svg() template.HTML {
	const w, h, left, right, top, bottom = 720.0, 240.0, 60.0, 130.0, 30.0, 34.0
	pw, ph := w-left-right, h-top-bottom
	xmax := 1.0
	for _, x := range c.xs {
		xmax = max(xmax, x)
	}
	yt := c.yAxis()
	ymax := yt[len(yt)-1]
	px := func(x float64) float64 { return left + pw*x/xmax }
	py := func(y float64) float64 { return top + ph*(1-y/ymax) }
	var b strings.Builder
	esc := template.HTMLEscapeString
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%g" height="%g" viewBox="0 0 %g %g" role="img" font-family="sans-serif">`, w, h, w, h)
	fmt.Fprintf(&b, `<text x="%g" y="18" font-size="14" font-weight="bold">%s</text>`, left, esc(c.title))
	for _, v := range yt {
		y := py(v)
		fmt.Fprintf(&b, `<line x1="%g" y1="%.1f" x2="%g" y2="%.1f" stroke="#e4e4e4"/>`, left, y, left+pw, y)
		fmt.Fprintf(&b, `<text x="%g" y="%.1f" font-size="10" text-anchor="end">%s</text>`, left-4, y+3, tickLabel(v))
	}
	for _, t := range timeTicks(xmax) {
		x := px(t)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%g" x2="%.1f" y2="%g" stroke="#e4e4e4"/>`, x, top, x, top+ph)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%g" x2="%.1f" y2="%g" stroke="#999"/>`, x, top+ph, x, top+ph+4)
		fmt.Fprintf(&b, `<text x="%.1f" y="%g" font-size="10" text-anchor="middle">%s</text>`, x, top+ph+15, timeLabel(t))
	}
	fmt.Fprintf(&b, `<rect x="%g" y="%g" width="%g" height="%g" fill="none" stroke="#999"/>`, left, top, pw, ph)
	fmt.Fprintf(&b, `<text x="12" y="%g" font-size="10" text-anchor="middle" transform="rotate(-90 12 %g)">%s</text>`, top+ph/2, top+ph/2, esc(c.unit))
	fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="10" text-anchor="middle">time since the start</text>`, left+pw/2, h-2)
	for i, s := range c.series {
		dash := ""
		if s.dash != "" {
			dash = fmt.Sprintf(` stroke-dasharray="%s"`, s.dash)
		}
		for _, seg := range segments(c.xs, s.ys) {
			if len(seg) == 1 { // a lone second between gaps: a dot
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="%g" fill="%s"/>`, px(seg[0][0]), py(seg[0][1]), s.width+0.5, s.color)
				continue
			}
			pts := make([]string, len(seg))
			for j, p := range seg {
				pts[j] = fmt.Sprintf("%.1f,%.1f", px(p[0]), py(p[1]))
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="%g"%s stroke-linejoin="round" points="%s"/>`,
				s.color, s.width, dash, strings.Join(pts, " "))
		}
		ly := top + 16*float64(i) + 10
		fmt.Fprintf(&b, `<line x1="%g" y1="%g" x2="%g" y2="%g" stroke="%s" stroke-width="%g"%s/>`, left+pw+10, ly, left+pw+34, ly, s.color, s.width+1, dash)
		fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="11">%s</text>`, left+pw+38, ly+4, esc(s.name))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// segments splits a series at its gaps (NaN) into runs of (x, y) points.
func segments(xs, ys []float64) [][][2]float64 {
	var out [][][2]float64
	var cur [][2]float64
	for i, y := range ys {
		if math.IsNaN(y) {
			if len(cur) > 0 {
				out = append(out, cur)
				cur = nil
			}
			continue
		}
		cur = append(cur, [2]float64{xs[i], y})
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// yTicks is about how many intervals a y axis is divided into.
const yTicks = 5

// niceTicks returns the ticks of a y axis from 0 that covers ymax: a step
// of 1, 2 or 5 times a power of ten, about yTicks of them, the last at or
// just above ymax. With integer (an axis of counts) the step is a whole
// number, at least 1. An empty axis (ymax <= 0) gets 0 and 1.
func niceTicks(ymax float64, integer bool) []float64 {
	if ymax <= 0 || math.IsNaN(ymax) || math.IsInf(ymax, 0) {
		return []float64{0, 1}
	}
	raw := ymax / yTicks
	exp := int(math.Floor(math.Log10(raw)))
	m := 10.0
	for _, c := range []float64{1, 2, 5} {
		if c*pow10(exp) >= raw*(1-1e-9) {
			m = c
			break
		}
	}
	if integer && (exp < 0 || exp == 0 && m < 1) {
		m, exp = 1, 0 // a count's step is at least 1
	}
	// tick i is i×m×10^exp, computed so that 0.1 steps do not drift to
	// 0.30000000000000004.
	tick := func(i int) float64 {
		if exp < 0 {
			return float64(i) * m / pow10(-exp)
		}
		return float64(i) * m * pow10(exp)
	}
	n := int(math.Ceil(ymax/tick(1) - 1e-9))
	ticks := make([]float64, n+1)
	for i := range ticks {
		ticks[i] = tick(i)
	}
	return ticks
}

func pow10(e int) float64 { return math.Pow10(e) }

// timeSteps are the spacings a time axis may have, in seconds.
var timeSteps = []float64{1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 4 * 3600}

// maxTimeTicks bounds the intervals of a time axis.
const maxTimeTicks = 8

// timeTicks returns the ticks of a time axis from 0 to tmax seconds: the
// smallest step of timeSteps that needs at most maxTimeTicks intervals,
// so a 30 s run is labelled every 5 s and a 10 min one every 2 min.
func timeTicks(tmax float64) []float64 {
	step := timeSteps[len(timeSteps)-1]
	for _, s := range timeSteps {
		if tmax/s <= maxTimeTicks {
			step = s
			break
		}
	}
	var ticks []float64
	for i := 0; float64(i)*step <= tmax+1e-9 && i <= 1000; i++ {
		ticks = append(ticks, float64(i)*step)
	}
	return ticks
}

// timeLabel writes t seconds as 45s, 2m, 1m30s, 1h or 1h30m.
func timeLabel(t float64) string {
	s := int(math.Round(t))
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600 && s%60 == 0:
		return fmt.Sprintf("%dm", s/60)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s%3600 == 0:
		return fmt.Sprintf("%dh", s/3600)
	}
	return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
}

var htmlPage = template.Must(template.New("report").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>imq loadtest {{.R.RunID}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
pre { background: #f6f6f6; padding: 1em; white-space: pre-wrap; }
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
