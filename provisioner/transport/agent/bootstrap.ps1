$m = $ExecutionContext.SessionState.LanguageMode
if ($m -ne 'FullLanguage') { throw ('constrained-language: PowerShell runs in {0} mode on this workstation (WDAC or AppLocker policy); the agent needs FullLanguage mode' -f $m) }
$v = $PSVersionTable.PSVersion
if ($v.Major -lt 5) { throw ('powershell-version: PowerShell {0} runs here; the agent needs Windows PowerShell 5.1 (WMF 5.1)' -f $v) }
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
try {
  $utf8 = [Text.Encoding]::UTF8
  Add-Type -AssemblyName System.Web.Extensions
  $parser = [Web.Script.Serialization.JavaScriptSerializer]::new()
  $parser.MaxJsonLength = [int]::MaxValue
  try { $envelope = $parser.DeserializeObject($utf8.GetString([Convert]::FromBase64String([Console]::In.ReadToEnd()))) } catch { throw 'the request is not valid JSON' }
  $out = @(& ([ScriptBlock]::Create($envelope['script'])) $envelope['request'])
  if ($out.Count -eq 0) { throw 'the agent script wrote no answer' }
  $json = ConvertTo-Json -InputObject $out[-1] -Compress -Depth 10
  [Console]::Out.Write([Convert]::ToBase64String($utf8.GetBytes($json)))
} catch {
  [Console]::Error.WriteLine(('{0} (line {1})' -f $_.Exception.Message, $_.InvocationInfo.ScriptLineNumber))
  exit 1
}
exit 0
